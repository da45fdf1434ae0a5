"""Reranker fine-tuning: the loss falls, P("True") separates positives from negatives, export reloads exactly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmembed_rag import Encoder
from mmembed_rag.finetune.arguments import ArgumentsError, LoraArguments
from mmembed_rag.finetune.examples import ContrastiveExample
from mmembed_rag.finetune.reranker_train import (
    RerankCollator,
    RerankerTrainArguments,
    RerankLoss,
    build_reranker,
    export_reranker,
    load_reranker_arguments,
    reranker_examples,
    train_reranker,
)
from mmembed_rag.finetune.synthetic import generate_benchmark, load_benchmark
from mmembed_rag.items import MultimodalItem
from mmembed_rag.reranker import MLLMReranker
from mmembed_rag.testing import make_tiny_qwen3_vl, make_tiny_reranker

RECIPE = Path(__file__).resolve().parents[2] / "finetune" / "recipes" / "reranker.yaml"
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "yellow": (230, 220, 20)}
COMPOSED = ["cirr_it2i", "infoseek_it2it"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine they spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["llava_next", "qwen3_vl"])
def base_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """A generative base of each family (the trainable reranker starts from either)."""
    # A large answer scale (the factories' defaults, for score-equality tests) saturates the answer logits: slow
    # to train.
    if request.param == "qwen3_vl":
        return make_tiny_qwen3_vl(tmp_path_factory.mktemp("rerank") / "qwen", kind="reranker", seed=0,
                                  answer_scale=1.0, dtype=torch.float32)
    return make_tiny_reranker(tmp_path_factory.mktemp("rerank") / "base", seed=0, answer_scale=3.0)


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "data"
    generate_benchmark(root, n_train=8, n_test=2)
    return root


def _args(base: Path, out: Path, **kw) -> RerankerTrainArguments:
    base_kw = dict(model_path=str(base), output_dir=str(out), lora=LoraArguments(rank=8, alpha=16, dropout=0.0),
                   batch_size=2, num_negatives=2, max_steps=2, learning_rate=3e-3, show_progress=False, log_every=1)
    return RerankerTrainArguments(**{**base_kw, **kw})


def _examples() -> list[ContrastiveExample]:
    """Composed queries (a colour patch + "the same in <colour>"): the edited patch True, the others False."""
    names = list(COLOURS)
    patches = {name: Image.new("RGB", (32, 32), rgb) for name, rgb in COLOURS.items()}
    out = []
    for i, name in enumerate(names):
        target = names[(i + 1) % len(names)]
        query = MultimodalItem(text=f"the same in {target}", image=patches[name], instruction="ignored")
        negatives = tuple(MultimodalItem(image=patches[n]) for n in names if n != target)
        out.append(ContrastiveExample(query, MultimodalItem(image=patches[target]), negatives[:2], qid=str(i)))
    return out


def _margin(reranker: MLLMReranker, batch) -> float:
    """Mean P("True") of the positives minus that of the negatives."""
    with torch.no_grad():
        p_true = torch.softmax(reranker.answer_logits(batch.queries, batch.candidates), -1)[:, 0]
    positive = batch.labels == 0
    return float(p_true[positive].mean() - p_true[~positive].mean())


@pytest.fixture(scope="module")
def trained(base_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A reranker after 24 steps on one repeated batch: (reranker, batch, losses, margin before, margin after)."""
    torch.manual_seed(0)
    reranker = build_reranker(_args(base_dir, tmp_path_factory.mktemp("unused")))
    batch = RerankCollator()(_examples())
    before = _margin(reranker, batch)
    optimizer = torch.optim.AdamW([p for p in reranker.model.parameters() if p.requires_grad], lr=3e-3)
    loss_fn, losses = RerankLoss("pointwise"), []
    for _ in range(24):
        loss = loss_fn(reranker.answer_logits(batch.queries, batch.candidates), batch.labels, batch.groups)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    reranker.model.eval()
    return reranker, batch, losses, before, _margin(reranker, batch)


def test_answer_logits_give_the_scores(base_dir: Path) -> None:
    reranker = MLLMReranker.from_pretrained(base_dir, device="cpu")
    batch = RerankCollator()(_examples()[:2])
    logits = reranker.answer_logits(batch.queries, batch.candidates)
    assert logits.shape == (len(batch.queries), 2) and logits.requires_grad
    expected = np.concatenate([reranker.score(batch.queries[i], batch.candidates[i:i + 3]) for i in (0, 3)])
    np.testing.assert_allclose(torch.softmax(logits, -1)[:, 0].detach().numpy(), expected, atol=1e-5)


def test_collator_pairs_positive_first_per_query() -> None:
    batch = RerankCollator()(_examples()[:2])
    assert batch.labels.tolist() == [0, 1, 1, 0, 1, 1] and batch.groups.tolist() == [0, 0, 0, 1, 1, 1]
    assert all(q.instruction is None and q.image is not None for q in batch.queries)


def test_loss_decreases_on_a_repeated_batch(trained) -> None:
    _, _, losses, _, _ = trained
    assert losses[-1] < 0.5 * losses[0], losses
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_positives_gain_p_true_over_negatives(trained) -> None:
    _, _, _, before, after = trained
    assert after > before + 0.3 and after > 0.4, (before, after)


def test_listwise_loss_is_the_positive_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [3.0, 0.0]])
    labels, groups = torch.tensor([0, 1, 1, 0, 1]), torch.tensor([0, 0, 0, 1, 1])
    margin = logits[:, 0] - logits[:, 1]
    expected = (-torch.log_softmax(margin[:3], 0)[0] - torch.log_softmax(margin[3:], 0)[0]) / 2
    assert torch.allclose(RerankLoss("listwise")(logits, labels, groups), expected)
    assert torch.allclose(RerankLoss()(logits, labels, groups), torch.nn.functional.cross_entropy(logits, labels))


def test_export_reloads_with_the_same_scores(trained, base_dir: Path, tmp_path: Path) -> None:
    reranker, batch, *_ = trained
    query, candidates = batch.queries[0], batch.candidates[:3]
    expected = reranker.score(query, candidates)
    out = export_reranker(reranker, tmp_path / "model", base_model=base_dir, training_args={"seed": 0})
    loaded = MLLMReranker.from_pretrained(out, device="cpu", dtype="float32")
    np.testing.assert_allclose(loaded.score(query, candidates), expected, atol=1e-5, rtol=0)
    assert not np.allclose(MLLMReranker.from_pretrained(base_dir, device="cpu").score(query, candidates), expected,
                           atol=1e-3)  # training moved the scores
    assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(base_dir / "model.safetensors")))
    assert hasattr(reranker.model.model.language_model, "peft_config")  # the in-memory model keeps its adapters


def test_recipe_loads_and_unknown_key_is_rejected(tmp_path: Path) -> None:
    args = load_reranker_arguments(RECIPE, {"model_path": "ckpt", "output_dir": "out"})
    assert args.lora.enabled and args.mining_top_k == 10 and args.loss == "pointwise"
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_path: a\noutput_dir: b\nlearning_rat: 0.1\n")
    with pytest.raises(ArgumentsError, match=r"unknown key\(s\) 'learning_rat' \(did you mean 'learning_rate'\?\)"):
        load_reranker_arguments(recipe)
    with pytest.raises(ArgumentsError, match="unknown key.*'lora.rnk'"):
        load_reranker_arguments(None, ["--model_path", "a", "--output_dir", "b", "--lora.rnk", "4"])
    with pytest.raises(ArgumentsError, match="num_negatives must be >= 1"):
        load_reranker_arguments(None, {"model_path": "a", "output_dir": "b", "num_negatives": 0})


def test_empty_training_data_is_an_error(base_dir: Path, synthetic_data: Path, tmp_path: Path) -> None:
    data = load_benchmark(synthetic_data, "train")
    with pytest.raises(ValueError, match="^no training data: the dataset has no queries$"):
        train_reranker(_args(base_dir, tmp_path / "a"), replace(data, queries=[]))
    with pytest.raises(ValueError, match=r"tasks \['nope'\] have no training queries; tasks in the data: \["):
        train_reranker(_args(base_dir, tmp_path / "b", tasks=["nope"]), data)
    assert not (tmp_path / "a").exists()  # raised before anything was written


def test_mined_negatives_come_from_the_bi_encoder_top_k(synthetic_data: Path, tiny_checkpoint: Path) -> None:
    data = load_benchmark(synthetic_data, "train")
    encoder = Encoder.from_pretrained(tiny_checkpoint, device="cpu")
    args = _args(Path("unused"), Path("unused"), tasks=COMPOSED, mining_top_k=3, num_negatives=2)
    examples = reranker_examples(args, data, encoder)
    queries = [q for q in data.queries if q.task in COMPOSED]
    assert len(examples) == len(queries) == 16
    query_emb = encoder.encode_queries([data.query_item(q) for q in queries])
    local = {task: list(data.local_pool(task)) for task in COMPOSED}
    pool_emb = {task: encoder.encode_documents([data.candidate_item(did) for did in local[task]]) for task in COMPOSED}
    for i, query in enumerate(queries):
        order = np.argsort(-(pool_emb[query.task] @ query_emb[i]))[:3]
        top = {local[query.task][j] for j in order} - data.positives(query)
        top_items = {(data.candidate_item(did).text, data.candidate_item(did).image) for did in top}
        negatives = {(neg.text, neg.image) for neg in examples[i].negatives}
        assert len(examples[i].negatives) == min(2, len(top)) and negatives <= top_items


def test_train_reranker_end_to_end_is_deterministic(base_dir: Path, synthetic_data: Path, tmp_path: Path) -> None:
    data = load_benchmark(synthetic_data, "train")
    outputs = [train_reranker(_args(base_dir, tmp_path / f"run{i}", tasks=COMPOSED), data) for i in range(2)]
    first, second = (load_file(str(out / "model.safetensors")) for out in outputs)
    assert all(torch.equal(first[k], second[k]) for k in first)
    base = load_file(str(base_dir / "model.safetensors"))
    assert any(not torch.equal(first[k], base[k].float()) for k in base)  # it trained
    reranker = MLLMReranker.from_pretrained(outputs[0], device="cpu")
    assert reranker.score("a red square", ["a red square", {"img": Image.new("RGB", (8, 8))}]).shape == (2,)
    assert (tmp_path / "run0" / "train_args.yaml").is_file()
    assert not (tmp_path / "run0" / "checkpoints").exists()  # save_every: 0 writes none
