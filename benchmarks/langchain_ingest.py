"""Ingest benchmark: ``langchain_chroma.Chroma.add_images`` with MMEmbedEmbeddings vs encode-only, and its size limit.

For each size N, on the same N small PNG files: encode-only throughput (``Encoder.encode_documents``), then
``Chroma.add_images`` into a fresh persistent collection (file reads + base64 documents + embedding + upsert). A
failure is recorded with its error type; for sizes above the client's max batch size the ingest is also timed in
chunks of that size (the workaround). Prints a table, then one JSON line.

Usage:
    python benchmarks/langchain_ingest.py                 # tiny model, sizes 1000 5461 5462 10000
    python benchmarks/langchain_ingest.py --quick         # seconds: sizes 64 256
    python benchmarks/langchain_ingest.py --checkpoint /path/to/ckpt --device cuda --sizes 1000
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit  # noqa: E402

from mmembed_rag import Encoder  # noqa: E402
from mmembed_rag.testing import make_tiny_checkpoint

logger = logging.getLogger("langchain_ingest")


def make_images(folder: Path, count: int, size: int) -> list[str]:
    """Write ``count`` distinct small PNGs (a coloured disc at varying positions)."""
    paths = []
    for i in range(count):
        image = Image.new("RGB", (size, size), (255, 255, 255))
        x, y = (i * 7) % (size // 2), (i * 13) % (size // 2)
        ImageDraw.Draw(image).ellipse((x, y, x + size // 2, y + size // 2),
                                      fill=((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
        path = folder / f"{i:06d}.png"
        image.save(path)
        paths.append(str(path))
    return paths


def run_size(emb: Any, uris: list[str], db: Path, chunked: bool) -> dict[str, Any]:
    """Time encode-only and ``Chroma.add_images`` for one size; failures are recorded, not raised."""
    from langchain_chroma import Chroma

    row: dict[str, Any] = {"n": len(uris)}
    start = time.perf_counter()
    emb.encoder.encode_documents([{"image": u} for u in uris], batch_size=emb.batch_size, show_progress=False)
    row["encode_items_per_s"] = len(uris) / (time.perf_counter() - start)

    store = Chroma(f"ingest-{uuid.uuid4().hex[:8]}", embedding_function=emb, persist_directory=str(db))
    max_batch = store._client.get_max_batch_size()
    start = time.perf_counter()
    try:
        store.add_images(uris)
    except Exception as exc:  # noqa: BLE001 -- the benchmark records whatever the stack raises
        row.update(add_images_ok=False, error_type=f"{type(exc).__module__}.{type(exc).__name__}",
                   error=str(exc).splitlines()[0][:160])
        logger.info("add_images(%d) failed after %.1fs: %s", len(uris), time.perf_counter() - start, row["error"])
    else:
        row.update(add_images_ok=True, add_images_items_per_s=len(uris) / (time.perf_counter() - start))
    row["stored"] = store._collection.count()
    if chunked and not row["add_images_ok"]:
        store.reset_collection()
        start = time.perf_counter()
        for first in range(0, len(uris), max_batch):
            store.add_images(uris[first:first + max_batch])
        row["chunked_items_per_s"] = len(uris) / (time.perf_counter() - start)
        row["chunked_stored"] = store._collection.count()
    row["max_batch_size"] = max_batch
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5461, 5462, 10000])
    parser.add_argument("--quick", action="store_true", help="sizes 64 and 256 only")
    parser.add_argument("--checkpoint", help="checkpoint directory (default: a tiny random one)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--no-chunked", action="store_true", help="skip the chunked ingest after a failure")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the result JSON (date, machine) to PATH")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from mmembed_rag.integrations.langchain import MMEmbedEmbeddings

    sizes = [64, 256] if args.quick else sorted(args.sizes)
    with tempfile.TemporaryDirectory(prefix="lc-ingest-") as tmp:
        tmp_path = Path(tmp)
        checkpoint = args.checkpoint or make_tiny_checkpoint(tmp_path / "tiny", seed=0)
        encoder = Encoder.from_pretrained(checkpoint, device=args.device, dtype=args.dtype)
        emb = MMEmbedEmbeddings(encoder=encoder, batch_size=args.batch_size)
        (tmp_path / "images").mkdir()
        uris = make_images(tmp_path / "images", max(sizes), args.image_size)
        emb.embed_image(uris[:8])  # warm-up
        rows = []
        for n in sizes:
            logger.info("size %d", n)
            rows.append(run_size(emb, uris[:n], tmp_path / f"db-{n}", chunked=not args.no_chunked))

    header = f"{'n':>6} {'encode/s':>9} {'add_images/s':>12} {'ratio':>6} {'stored':>6} {'chunked/s':>9}  error"
    print(header)
    for r in rows:
        add = r.get("add_images_items_per_s")
        print(f"{r['n']:>6} {r['encode_items_per_s']:>9.0f} {add or float('nan'):>12.0f} "
              f"{(add or float('nan')) / r['encode_items_per_s']:>6.2f} {r['stored']:>6} "
              f"{r.get('chunked_items_per_s', float('nan')):>9.0f}  {r.get('error_type', '')}")
    survived = [r["n"] for r in rows if r["add_images_ok"]]
    result = {"benchmark": "langchain_ingest", "checkpoint": str(args.checkpoint or "tiny"), "device": args.device,
              "image_size": args.image_size, "batch_size": args.batch_size, "rows": rows,
              "largest_ingest_ok": max(survived) if survived else None,
              "smallest_ingest_failed": min((r["n"] for r in rows if not r["add_images_ok"]), default=None)}
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
