"""GPU throughput and model FLOP utilisation (MFU) of an MM-Embed-sized model behind the Encoder.

Model: MM-Embed's dimensions (Mistral-7B decoder: hidden 4096, 32 layers, 32 heads / 8 KV heads,
intermediate 14336, NV-Embed-v1's 32000-row embedding; CLIP ViT-L/14-336: hidden 1024, 24 layers, 16 heads,
intermediate 4096; projector; latent attention: 512 latents, 8 heads, head_dim 4096, ff_mult 4; 8.2B parameters), random
bf16 weights built directly on the GPU, in an ``Encoder`` with a tiny checkpoint's tokenizer. Items:
text (~128 tokens) or images (1024x768 JPEG bytes, decoded and resized by the Encoder: 581 tokens).

FLOPs of one forward pass, analytic, on real tokens (padding excluded); W = matmul weights:
    2 * W_tok * T                        T tokens; W_tok: decoder q/k/v/o, gate/up/down of every layer,
                                         pooler to_q, to_out and feed-forward
  + sum_rows 4 * L^2 * d * n_layers      decoder attention (QK^T, AV); L row length, d = heads * head_dim
  + sum_rows 4 * L * n_latents * d_lat   pooler cross-attention to the latents, d_lat = heads * head_dim
  + 2 * W_kv * n_latents                 pooler to_kv on the latents, once per batch (shared)
  + per image 2 * (W_vis * S + (W_patch + W_proj) * P) + 4 * S^2 * d_vis * n_vis_layers  (P = 576, S = 577)
MFU = FLOPs / seconds / peak dense bf16 FLOP/s (``--peak-tflops``; by device name otherwise: H100 SXM 989,
H200 989, A100 312). End-to-end MFU times ``encode_documents``; forward MFU times the model alone on
the same pre-built batches. Goal: end-to-end MFU >= 40% at batch >= 16.

Without CUDA it exits with status 2. ``--dry-run`` needs no GPU: it checks the analytic weight count
against the full-size model built on the meta device, checks the FLOP formula against torch's
FlopCounterMode on a tiny CPU model, and runs the timing loop on that tiny model.
"""

from __future__ import annotations

import argparse
import io
import logging
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoTokenizer, LlavaNextConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    add_output_args,
    clip_vision_config,
    emit,
    goal,
    mistral_config,
    print_table,
    random_text,
    setup_logging,
    synthetic_image,
)

from mmembed_rag import Encoder  # noqa: E402
from mmembed_rag.families.llava_next import MMEmbedFamily  # noqa: E402
from mmembed_rag.items import MultimodalItem  # noqa: E402
from mmembed_rag.modeling import profiles  # noqa: E402
from mmembed_rag.modeling.model import MMEmbedModel  # noqa: E402
from mmembed_rag.preprocessing import GlobalViewProcessor  # noqa: E402
from mmembed_rag.testing import make_tiny_checkpoint, tiny_config  # noqa: E402

logger = logging.getLogger("gpu_encode")

SIZES: dict[str, dict[str, dict[str, int]]] = {
    "full": {"text": {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 8, "intermediate": 14336, "vocab": 32000},
             "vision": {"hidden": 1024, "layers": 24, "heads": 16, "intermediate": 4096},
             "pooling": {"num_latents": 512, "heads": 8, "head_dim": 4096, "ff_mult": 4}},
    "tiny": {"text": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 160, "vocab": 32000},
             "vision": {"hidden": 32, "layers": 3, "heads": 2, "intermediate": 64},
             "pooling": {"num_latents": 16, "heads": 2, "head_dim": 16, "ff_mult": 4}},
}


def default_peak(name: str) -> float | None:
    """Dense bf16 peak TFLOP/s by device name; None when unknown (H100 PCIe / NVL differ from SXM)."""
    if "H100" in name and ("PCIe" in name or "NVL" in name):
        return None
    return next((peak for key, peak in (("H200", 989.0), ("H100", 989.0), ("A100", 312.0)) if key in name), None)


def build_config(sizes: dict[str, dict[str, int]], image_token_index: int) -> LlavaNextConfig:
    """LLaVA-NeXT config with the release's fields at ``sizes`` (336 px, patch 14)."""
    raw = tiny_config(image_token_index, sizes["text"]["vocab"], image_size=336, patch_size=14,
                      text_config=mistral_config(**sizes["text"]), vision_config=clip_vision_config(**sizes["vision"]))
    raw.pop("torch_dtype")
    # As the release builds it: NV-Embed-v1's language model (the profile), a 32000-row embedding.
    return profiles.build_config(raw, embedding_rows=sizes["text"]["vocab"])


def build_model(config: LlavaNextConfig, pooling: dict[str, int], device: str, dtype: torch.dtype) -> MMEmbedModel:
    """Random-weight model allocated and initialised on ``device`` in ``dtype`` (no CPU copy)."""
    for sub in (config.text_config, config.vision_config):
        sub.dtype = dtype
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MMEmbedModel(config, pooling="latent_attention", pooling_options=pooling)
    finally:
        torch.set_default_dtype(previous)
    placed = {(p.device.type, p.dtype) for p in model.parameters()}
    if placed != {(torch.device(device).type, dtype)}:
        raise RuntimeError(f"parameters ended up as {placed}, expected {device} / {dtype}")
    return model.eval()


def weights(config: LlavaNextConfig, pooling: dict[str, int]) -> dict[str, int]:
    """Matmul weight counts by how often they are applied (biases, norms and embeddings left out)."""
    t, v = config.text_config, config.vision_config
    d, head = t.hidden_size, getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    q, kv = t.num_attention_heads * head, t.num_key_value_heads * head
    inner, ff = pooling["heads"] * pooling["head_dim"], pooling["ff_mult"] * d
    vd, layers = v.hidden_size, config.vision_feature_layer
    features = vd * (len(layers) if isinstance(layers, (list, tuple)) else 1)
    return {"token": t.num_hidden_layers * (2 * d * q + 2 * d * kv + 3 * d * t.intermediate_size)
            + 2 * d * inner + 3 * d * ff,
            "latent_kv": 2 * d * inner,
            "vision": v.num_hidden_layers * (4 * vd * vd + 2 * vd * v.intermediate_size),
            "patch": 3 * v.patch_size ** 2 * vd,
            "projector": features * d + d * d}


def forward_flops(config: LlavaNextConfig, pooling: dict[str, int], lengths: list[int], images: int) -> int:
    """Analytic FLOPs of one forward pass over rows of ``lengths`` tokens holding ``images`` images."""
    t, v, w = config.text_config, config.vision_config, weights(config, pooling)
    head = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    d_attn, d_lat = t.num_attention_heads * head, pooling["heads"] * pooling["head_dim"]
    flops = 2 * w["token"] * sum(lengths) + 2 * w["latent_kv"] * pooling["num_latents"]
    flops += sum(4 * n * n * d_attn * t.num_hidden_layers + 4 * n * pooling["num_latents"] * d_lat for n in lengths)
    patches = (v.image_size // v.patch_size) ** 2
    seq = patches + 1
    per_image = 2 * (w["vision"] * seq + (w["patch"] + w["projector"]) * patches)
    per_image += 4 * seq * seq * v.hidden_size * v.num_hidden_layers
    return flops + images * per_image


def make_items(encoder: Encoder, kind: str, count: int, seed: int = 0, text_tokens: int = 128) -> list:
    """``count`` text items of ~``text_tokens`` tokens, or image items (1024x768 JPEG bytes, 8 distinct)."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    if kind == "image":
        jpegs = []
        for _ in range(min(count, 8)):
            synthetic_image(np_rng, 1024, 768).save(buffer := io.BytesIO(), format="JPEG", quality=90)
            jpegs.append(buffer.getvalue())
        return [MultimodalItem(image=jpegs[i % len(jpegs)]) for i in range(count)]
    items = []
    for _ in range(count):
        words = random_text(rng, text_tokens).split()
        k = next((k for k in range(text_tokens // 4, len(words))
                  if len(encoder.family.prompts.document(" ".join(words[:k]), False).ids) >= text_tokens), len(words))
        items.append(MultimodalItem(text=" ".join(words[:k])))
    return items


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(encoder: Encoder, pooling: dict[str, int], items: list, batch_size: int, warmup: int,
            peak: float | None) -> dict[str, Any]:
    """End-to-end and forward-only seconds, items/s and MFU for ``items`` at ``batch_size``."""
    model, device = encoder.model, encoder.device
    prompts = [encoder.family.prompts.document(it.text, it.image is not None) for it in items]
    batches = [b.to(device) for b in encoder.batches(items, prompts, batch_size)]
    images = [0 if b.inputs["pixel_values"] is None else b.inputs["pixel_values"].shape[0] for b in batches]
    flops = sum(forward_flops(model.config, pooling, b.inputs["attention_mask"].sum(1).tolist(), m)
                for b, m in zip(batches, images))
    with torch.inference_mode():
        for _ in range(warmup):
            model(**batches[0].inputs)
        encoder.encode_documents(items[:batch_size], batch_size=batch_size, show_progress=False)
        sync(device)
        start = time.perf_counter()
        for b in batches:
            model(**b.inputs)
        sync(device)
        forward_s = time.perf_counter() - start
    start = time.perf_counter()
    encoder.encode_documents(items, batch_size=batch_size, show_progress=False)  # returns host arrays: synced
    e2e_s, n = time.perf_counter() - start, len(items)
    return {"batch_size": batch_size, "items": n, "e2e_s": e2e_s, "forward_s": forward_s, "flops": flops,
            "tokens_per_item": (sum(len(p.ids) for p in prompts) + sum(images) * (model.tokens_per_image - 1)) / n,
            "e2e_items_per_s": n / e2e_s, "fwd_items_per_s": n / forward_s,
            "mfu_e2e": flops / e2e_s / (peak * 1e12) if peak else None,
            "mfu_fwd": flops / forward_s / (peak * 1e12) if peak else None}


def flop_checks(encoder: Encoder, pooling: dict[str, int], full: LlavaNextConfig) -> list[list[Any]]:
    """[check, expected, got, ok] rows: formula vs FlopCounterMode (tiny model), weights vs modules (full)."""
    rows = []
    for kind in ("text", "image"):
        items = make_items(encoder, kind, 2)
        prompts = [encoder.family.prompts.document(it.text, it.image is not None) for it in items]
        b = next(iter(encoder.batches(items, prompts, 2)))
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math: counted as bmm
            encoder.model(**b.inputs)
        padded = [b.inputs["input_ids"].shape[1]] * b.inputs["input_ids"].shape[0]  # the counter sees padding too
        expected = forward_flops(encoder.model.config, pooling, padded, 0 if b.inputs["pixel_values"] is None else 2)
        got = counter.get_total_flops()
        rows.append([f"FLOPs, tiny model, 2 {kind} items", expected, got, abs(got - expected) <= 1e-6 * expected])
    for name, config, pool in (("tiny", encoder.model.config, pooling), ("full", full, SIZES["full"]["pooling"])):
        with torch.device("meta"):
            model = MMEmbedModel(config, pooling_options=pool)
        expected = sum(weights(config, pool).values())
        got = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        rows.append([f"matmul weights, {name} model", expected, got, expected == got])
        if name == "full":
            logger.info("full-size model: %.3fB parameters", sum(p.numel() for p in model.parameters()) / 1e9)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default 1 4 16 32 (quick: 1 16)")
    parser.add_argument("--iters", type=int, help="batches timed per point, 16 items at least (default 4, quick 2)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up forward passes per point (default 2)")
    parser.add_argument("--peak-tflops", type=float, help="peak dense bf16 TFLOP/s of the device")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU: check FLOP counting, no GPU")
    add_output_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    sizes, device, dtype, peak = SIZES["tiny" if args.dry_run else "full"], "cpu", torch.float32, args.peak_tflops
    if not args.dry_run:
        if not torch.cuda.is_available():
            parser.exit(2, "no CUDA device: torch.cuda.is_available() is False (use --dry-run to check on CPU)\n")
        device, dtype, name = "cuda", torch.bfloat16, torch.cuda.get_device_name()
        peak = peak or default_peak(name)
        if peak is None:
            parser.exit(2, f"unknown peak for {name!r}: pass --peak-tflops (dense bf16 TFLOP/s)\n")
    batch_sizes = args.batch_sizes or ([1, 4] if args.dry_run else [1, 16] if args.quick else [1, 4, 16, 32])
    iters = args.iters or (1 if args.dry_run else 2 if args.quick else 4)

    with tempfile.TemporaryDirectory(prefix="mmembed-gpu-") as tmp:  # only for the tokenizer
        path = make_tiny_checkpoint(Path(tmp) / "tok")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    config = build_config(sizes, image_id)
    logger.info("building the %s model on %s in %s", "tiny" if args.dry_run else "full-size", device, dtype)
    model = build_model(config, sizes["pooling"], device, dtype)
    params = sum(p.numel() for p in model.parameters())
    logger.info("built: %.3fB parameters", params / 1e9)
    encoder = Encoder(MMEmbedFamily(model, tokenizer, GlobalViewProcessor(336), max_length=512))

    checks = flop_checks(encoder, sizes["pooling"], build_config(SIZES["full"], image_id)) if args.dry_run else []
    points = []
    for kind in ("text", "image"):
        for bs in batch_sizes:
            items = make_items(encoder, kind, max(bs * iters, 16), seed=bs)
            points.append({"kind": kind, **measure(encoder, sizes["pooling"], items, bs, args.warmup, peak)})
            logger.info("%s batch %d: %.1f items/s end-to-end", kind, bs, points[-1]["e2e_items_per_s"])

    device_name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"device: {device_name}{' (dry run, tiny model)' if args.dry_run else ''}, peak {peak or 'n/a'} TFLOP/s")
    print_table(["kind", "batch", "tokens/item", "e2e items/s", "fwd items/s", "e2e TFLOP/s", "MFU e2e", "MFU fwd"],
                [[p["kind"], p["batch_size"], round(p["tokens_per_item"]), p["e2e_items_per_s"], p["fwd_items_per_s"],
                  p["flops"] / p["e2e_s"] / 1e12, _pct(p["mfu_e2e"]), _pct(p["mfu_fwd"])] for p in points])
    goals = {f"mfu_{p['kind']}_b{p['batch_size']}": goal(p["mfu_e2e"], 0.40, True)
             for p in points if p["batch_size"] >= 16 and p["mfu_e2e"] is not None}
    if checks:
        print()
        print_table(["check", "expected", "got", "ok"], checks)
    missed = [k for k, g in goals.items() if not g["met"]] + [c[0] for c in checks if not c[3]]
    print(f"GOAL MISSED: {', '.join(missed)}" if missed else "all goals met" if goals else "no MFU goal evaluated")
    emit({"benchmark": "gpu_encode", "date": date.today().isoformat(), "dry_run": args.dry_run, "quick": args.quick,
          "device": device_name, "peak_tflops": peak, "params": params,
          "points": [{k: round(v, 6) if isinstance(v, float) else v for k, v in p.items()} for p in points],
          "checks": [{"check": c[0], "expected": c[1], "got": c[2], "ok": bool(c[3])} for c in checks],
          "goals": goals, "all_goals_met": not missed}, args.json)
    return 1 if any(not c[3] for c in checks) else 0


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
