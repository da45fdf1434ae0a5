"""The tutorial notebooks: committed without outputs, and each runs top to bottom (QUICK settings) offline.

Each notebook is executed by nbclient in a kernel started from THIS interpreter (a kernelspec written to a
temporary directory, so neither a ``python3`` kernelspec elsewhere on the machine nor the user's home is
involved), with ``cwd``, ``TMPDIR`` and the Jupyter/IPython runtime directories inside pytest's temporary
directory and the Hugging Face hub set offline. The checks look for the outputs a reader is meant to see.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402
from nbclient import NotebookClient  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "mmembed-rag-tests"
# Modules each notebook needs beyond the core (its extras); the test is skipped when one is missing.
REQUIRES = {
    "01_multimodal_rag_llama_index.ipynb": ["llama_index.core", "llama_index.vector_stores.chroma", "chromadb"],
    "02_langchain_multimodal_qa.ipynb": ["langchain_core", "langchain_chroma", "chromadb"],
    "03_finetune_domain_variant.ipynb": ["peft", "yaml", "ir_measures"],
}


def _notebook_paths() -> list[Path]:
    return sorted(NOTEBOOKS.glob("*.ipynb"))


def _missing(modules: list[str]) -> list[str]:
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


def _quick(nb) -> None:
    """Set ``QUICK = True`` in the cell tagged "parameters" (the notebook's sizes follow from it)."""
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "a notebook needs exactly one code cell tagged 'parameters'"
    source, count = re.subn(r"(?m)^QUICK\s*=.*$", "QUICK = True", cells[0].source)
    assert count == 1, "the parameters cell must set QUICK"
    cells[0].source = source


def _kernel_manager(tmp_path: Path) -> AsyncKernelManager:
    """A kernel manager whose only kernelspec runs ipykernel on this interpreter (this venv's python)."""
    spec = tmp_path / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    return AsyncKernelManager(kernel_name=KERNEL,
                              kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))


def _text(nb) -> str:
    """Everything the notebook printed (stdout) and displayed as Markdown, in order."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream" and out.name == "stdout":
                parts.append(out.text)
            elif out.output_type in ("display_data", "execute_result") and "text/markdown" in out.data:
                parts.append(out.data["text/markdown"])
    return "\n".join(parts)


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


@pytest.fixture(scope="session")
def demo_models(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's trained models, which the notebooks load: trained once (about 6 minutes on two cores).

    Kept in pytest's cache directory when it has one, so later runs reuse them (every pipeline step is keyed
    by a hash of its inputs); else in a temporary directory.
    """
    from mmembed_rag.demo import train_demo

    cache = getattr(request.config, "cache", None)
    root = Path(cache.mkdir("demo-models")) if cache is not None else tmp_path_factory.mktemp("demo-models")
    train_demo(root)
    return root


@pytest.fixture()
def run_notebook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, demo_models: Path):
    # Connection files and IPython's profile go to the temporary directory too, not to the user's home.
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))

    def run(name: str):
        missing = _missing(REQUIRES.get(name, []))
        if missing:
            pytest.skip(f"{name} needs {', '.join(missing)}")
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        _quick(nb)
        nb.cells.append(nbformat.v4.new_code_cell("import sys, tempfile\nprint('KERNEL', sys.executable)"))
        work, temp = tmp_path / "cwd", tmp_path / "tmp"
        work.mkdir()
        temp.mkdir()
        env = {**os.environ, "TMPDIR": str(temp), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "MMEMBED_RAG_DEMO_DIR": str(demo_models)}
        client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=300,
                                resources={"metadata": {"path": str(work)}})
        client.execute(env=env)  # raises CellExecutionError, naming the cell, when a cell fails
        assert f"KERNEL {sys.executable}" in _text(nb), "the notebook ran on another interpreter"
        assert list(work.iterdir()) == [], "the notebook wrote into its working directory"
        assert list(temp.iterdir()) == [], "the notebook left files in its temporary directory"
        return nb

    return run


def test_the_three_tutorials_are_there() -> None:
    assert [p.name for p in _notebook_paths()] == sorted(REQUIRES)


@pytest.mark.parametrize("path", _notebook_paths(), ids=lambda p: p.name)
def test_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {index} has outputs; clear them before committing"
            assert cell.execution_count is None, f"{path.name}: cell {index} has an execution count"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.timeout(1500)  # the first notebook test also trains the demo's models (about 10 min)
def test_llama_index_rag(run_notebook) -> None:
    nb = run_notebook("01_multimodal_rag_llama_index.ipynb")
    text = _text(nb)
    assert re.search(r"\d+ vectors in collection 'shapes'", text)
    tables = re.findall(r"(?m)^rank +score +(rerank +cosine +)?kind +content$", text)
    assert len(tables) == 4 and tables[-1], "text->image, image->text, composed, then a reranked table"
    rows = re.findall(r"(?m)^ +\d+ +-?\d\.\d{3} .*?(image\+text|image|text) ", text)
    assert {"image", "text"} <= set(rows)
    # The demo's trained model answers right: the red circle's picture for its caption, its caption for the picture.
    firsts = re.findall(r"(?m)^ +1 +-?\d\.\d{3} +(.*)$", text)
    assert re.fullmatch(r"image +red-circle\.png", firsts[0].strip()), firsts
    assert re.fullmatch(r"text +a solid circle in red, large, in the center", firsts[1].strip()), firsts
    assert _images(nb) >= 3  # the corpus, the query image, image hits


@pytest.mark.timeout(1500)
def test_langchain_multimodal_qa(run_notebook) -> None:
    nb = run_notebook("02_langchain_multimodal_qa.ipynb")
    text = _text(nb)
    answers = re.findall(r"(?m)^Assistant: \[stand-in\] .*$", text)
    assert len(answers) == 3
    # The trained model finds the passage that answers the text question and the picture question.
    assert "Novisa is the large outlined green triangle" in answers[0] and "Kalomi" in answers[1], answers
    assert "[+ image user-photo.png]" in text  # a turn with an image
    sources = re.findall(r"(?m)^ +\d +-?\d\.\d{3} +-?\d\.\d{3} +(image|text) +(\S+)", text)
    assert len(sources) == 9  # three sources per answer
    assert any(kind == "image" and ref.endswith(".png") for kind, ref in sources)


@pytest.mark.timeout(1500)
def test_finetune_domain_variant(run_notebook) -> None:
    nb = run_notebook("03_finetune_domain_variant.ipynb")
    text = _text(nb)
    assert "is not in the candidate pool" in text  # the validation example
    assert re.search(r"(?m)^mscoco_t2i +\d+ +\d+ +\d+ +\d+$", text)  # the mining counts
    assert re.search(r"(?m)^\| cirr_it2i \| CIRR \| 7 \| global \| \d+ \| [\d.]+ \| [\d.]+ \|$", text)
    assert re.search(r"(?m)^\| stage 2 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", text)
    assert "config.json" in text and "model.safetensors.index.json" in text
    match = re.search(r"same query: cosine (\d\.\d+)", text)
    assert match and float(match.group(1)) > 0.99
    mine, other = map(float, re.search(r"cosine with its image (-?\d\.\d+), with an unrelated passage (-?\d\.\d+)",
                                       text).groups())
    assert mine > other + 0.3  # a trained model tells them apart
