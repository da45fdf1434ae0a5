"""Helpers shared by the benchmark scripts: model-size configs, synthetic inputs, tables, goals, JSON line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # the library (and torch) load only where a benchmark needs them
    from mmembed_rag import Encoder
    from mmembed_rag.items import MultimodalItem

__all__ = ["WORDS", "add_output_args", "busy_cpu_s", "clip_vision_config", "emit", "goal", "machine",
           "mistral_config", "padding_ratio", "padding_waste", "print_table", "random_text", "setup_logging",
           "synthetic_image", "timed", "tiny_vocab"]

# Caption / passage vocabulary; with the tiny checkpoints' BPE a word is about two tokens.
WORDS = (
    "a the of in on with and to for from is are was by at as it this that near over under between "
    "red green blue yellow black white bright dark small large old new tall round square "
    "photo picture image chart map diagram painting drawing street city river mountain garden "
    "house window table chair car train boat bridge tree flower field forest beach sky cloud sun "
    "water light shadow person people child woman man dog cat bird horse group crowd market museum "
    "morning evening night winter summer running sitting standing holding looking walking shows "
    "energy plant glucose chemical stored converts election rally news event question answer evidence"
).split()


def tiny_vocab(vocab_size: int = 1000) -> int:
    """A model vocabulary size that covers ``make_tiny_checkpoint(vocab_size=...)``'s tokenizer."""
    return (vocab_size + 2 + 63) // 64 * 64


def mistral_config(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
                   max_positions: int = 4096) -> dict[str, Any]:
    """A complete ``text_config`` dict (Mistral decoder) for ``tiny_config`` / ``make_tiny_checkpoint``."""
    return {"hidden_size": hidden, "intermediate_size": intermediate, "max_position_embeddings": max_positions,
            "model_type": "mistral", "num_attention_heads": heads, "num_hidden_layers": layers,
            "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-05, "sliding_window": None, "vocab_size": vocab}


def clip_vision_config(hidden: int, layers: int, heads: int, intermediate: int, image_size: int = 336,
                       patch_size: int = 14) -> dict[str, Any]:
    """A complete ``vision_config`` dict (CLIP ViT) for ``tiny_config`` / ``make_tiny_checkpoint``."""
    return {"hidden_size": hidden, "image_size": image_size, "intermediate_size": intermediate,
            "model_type": "clip_vision_model", "num_attention_heads": heads, "num_hidden_layers": layers,
            "patch_size": patch_size, "projection_dim": hidden}


def build_cpu_checkpoint(root: Path) -> Path:
    """The ~100M-parameter random MM-Embed-format checkpoint of the CPU benchmarks (336 px images), float32."""
    import torch

    from mmembed_rag.testing import make_tiny_checkpoint

    text = mistral_config(hidden=768, layers=8, heads=8, kv_heads=4, intermediate=2560, vocab=tiny_vocab())
    vision = clip_vision_config(hidden=384, layers=6, heads=6, intermediate=1536, image_size=336, patch_size=14)
    return make_tiny_checkpoint(root / "model", seed=0, dtype=torch.float32, image_size=336,
                                text_config=text, vision_config=vision, max_shard_bytes=2**30)


def random_text(rng: random.Random, words: int) -> str:
    """``words`` words drawn from :data:`WORDS`, capitalised, with a full stop every ~12 words."""
    out = []
    for i in range(words):
        word = rng.choice(WORDS)
        out.append(word.capitalize() if i == 0 or out[-1].endswith(".") else word)
        if i % 12 == 11:
            out[-1] += "."
    return " ".join(out)


def synthetic_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: colour gradients, a few flat rectangles and sensor-like noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * rng.uniform(120, 255, 3)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        base[y0:y0 + height // 3, x0:x0 + width // 3] = rng.uniform(0, 255, 3)
    noise = rng.normal(0.0, 12.0, (height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--quick``, ``--json PATH`` and ``--verbose``, common to every benchmark."""
    parser.add_argument("--quick", action="store_true", help="small smoke-test run (well under a minute)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the result JSON to PATH")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def goal(value: float, target: float, higher_is_better: bool) -> dict[str, Any]:
    """A goal record: the value, the target as text (``">= 0.9"``) and whether it is met."""
    met = value >= target if higher_is_better else value <= target
    return {"value": round(value, 4), "goal": f"{'>=' if higher_is_better else '<='} {target}", "met": bool(met)}


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """Print a plain, aligned text table (floats with 3 significant decimals)."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))


def machine() -> dict[str, Any]:
    """Where a figure was measured: host, CPUs, accelerator, library versions."""
    import torch

    return {"host": platform.node(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def emit(result: dict[str, Any], json_path: Path | None) -> None:
    """Print the result (with the date and :func:`machine`) as the final JSON line; also write it to ``json_path``."""
    result = {**result, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine()}
    line = json.dumps(result, sort_keys=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(line + "\n")
    print(line, flush=True)


def padding_ratio(lengths: list[int], groups: list[list[int]]) -> float:
    """Tokens computed (rows x longest row per batch) / tokens needed (sum of row lengths)."""
    computed = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    return computed / sum(lengths[i] for g in groups for i in g)


def padding_waste(encoder: Encoder, items: list[MultimodalItem], batch_size: int) -> tuple[float, float]:
    """(the Encoder's length-sorted batches, input order); the sorted groups are ``encoder.batches``' own plan,
    with collation stubbed out so that no image is loaded."""
    from mmembed_rag.families import Batch

    prompts = encoder.document_prompts(items)
    lengths = [encoder.token_count(p) for p in prompts]
    encoder.collate = lambda _items, _prompts, positions: Batch(positions, {})  # instance attribute: plan only
    try:
        planned = [b.positions for b in encoder.batches(items, prompts, batch_size)]
    finally:
        del encoder.collate
    in_order = [list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)]
    return padding_ratio(lengths, planned), padding_ratio(lengths, in_order)


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (Linux /proc/stat; NaN elsewhere)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
    """(result, wall seconds, share of the machine's CPUs other processes used meanwhile)."""
    busy, cpu, start = busy_cpu_s(), time.process_time(), time.perf_counter()
    result = fn(*args)
    wall = time.perf_counter() - start
    foreign = (busy_cpu_s() - busy) - (time.process_time() - cpu)
    return result, wall, max(0.0, foreign / (wall * (os.cpu_count() or 1)))
