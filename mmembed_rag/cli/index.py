"""``mmembed-rag index PATH...``: encode folders of images, text, Markdown and JSON Lines into a collection.

Every item is read and every image opened before anything is written, and the items are written by one
streaming ``MultimodalCollection.add`` call: a run that fails writes nothing. Re-running is safe: ids are derived
from content (text and image path), so an item indexed again overwrites itself.

Under a launcher (``torchrun --nproc_per_node N -m mmembed_rag.cli.main index ...``)
process ``r`` of ``N`` encodes items ``r, r+N, r+2N...`` of the global order and writes them to a Chroma
server (``--host/--port``); an embedded database accepts one writer only and is refused.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import (
    StoreLocation,
    UsageError,
    emit_json,
    make_client,
    non_negative_int,
    positive_int,
    resolve_model,
    store_location,
)
from .distributed import Shard, env_rank, join_processes
from .sources import Entry, Scan, file_kind, iter_entries, scan_paths

if TYPE_CHECKING:  # chromadb is an extra
    from mmembed_rag.store import MultimodalCollection

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)

_OPEN_ATTEMPTS = 5  # processes without a process group may race to create the same collection


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register the ``index`` command."""
    parser = subparsers.add_parser("index", parents=parents, help="index folders of images, text and JSON Lines",
                                   description="Encode folders of images, text, Markdown and JSON Lines into a "
                                               "collection.",
                                   epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (searched recursively)")
    parser.add_argument("--max-chars", type=non_negative_int, default=1000,
                        help="longest text passage; text files are cut at blank lines (0: one item per file)")
    parser.add_argument("--image-root", type=Path,
                        help="folder that relative image paths in .jsonl files start from (default: the file's)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="items per forward pass")
    parser.add_argument("--chunk-size", type=positive_int, default=128,
                        help="items encoded and written together (the next chunk is encoded while one is written)")
    parser.add_argument("--modality-index", action="store_true",
                        help="also keep one shadow collection per modality, so that `search --modality` is a plain "
                             "vector query (twice the storage; later runs and searches find it themselves)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Index ``args.paths``; print a report (or one JSON document with ``--json``)."""
    rank, world = env_rank()
    location = store_location(args)
    if world > 1 and not location.remote:
        raise UsageError(f"{world} processes cannot write one embedded database ({location}: SQLite allows a "
                         "single writer); start a Chroma server (`chroma run --path DIR --port 8000`) and pass "
                         "--host/--port, or run one process")
    if args.image_root is not None and not args.image_root.is_dir():
        raise UsageError(f"--image-root {args.image_root}: no such folder")
    scan = scan_paths(args.paths)
    total, mine = _validate(scan, args, rank, world)
    shard = join_processes(args.device)
    try:
        collection = _open(args, location, shard)
        started = time.perf_counter()
        ids, modalities = _write(collection, scan, args, shard, mine)
        shard.barrier()
        entry = {"rank": shard.rank, "items": mine, "modalities": dict(modalities), "ids": ids,
                 "seconds": round(time.perf_counter() - started, 3)}
        ranks = shard.gather(entry)
        count = collection.count()
        if shard.grouped and shard.rank != 0:
            return 0
        report = _report(args, location, collection, scan, total, ranks, count, world)
        if args.json:
            emit_json(report)
        else:
            _print(report, shard)
        return 0
    finally:
        shard.close()


def _validate(scan: Scan, args: argparse.Namespace, rank: int, world: int) -> tuple[int, int]:
    """Read every item and open every image once before anything is written (bad input fails now, naming the item
    by its position in the whole run and its file); the counts size the progress bar."""
    from mmembed_rag.errors import ImageLoadError
    from mmembed_rag.images import load_image

    total = mine = 0
    for ordinal, entry in enumerate(_entries(scan, args)):
        image = entry.item.image
        if image is not None and not (isinstance(image, str) and "://" in image):  # URLs are fetched when encoded
            try:
                load_image(image, index=ordinal).close()
            except ImageLoadError as exc:
                raise UsageError(f"{exc} (in {entry.metadata['source']}; nothing was written)") from exc
        total += 1
        mine += ordinal % world == rank
    if total == 0:
        raise UsageError(f"nothing to index in {', '.join(args.paths)}: no supported file with content "
                         f"({len(scan.skipped)} unsupported file(s) skipped)")
    for path in scan.skipped:
        logger.debug("skipped unsupported file %s", path)
    return total, mine


def _entries(scan: Scan, args: argparse.Namespace) -> Iterator[Entry]:
    return iter_entries(scan.files, max_chars=args.max_chars, image_root=args.image_root)


def _open(args: argparse.Namespace, location: StoreLocation, shard: Shard) -> MultimodalCollection:
    from mmembed_rag.hub import DEFAULT_MODEL
    from mmembed_rag.store import MultimodalCollection, StoreError, cached_encoder

    device = args.device or shard.device
    model = args.model
    if model is None and not location.remote and not Path(location.persist_dir).exists():
        model = DEFAULT_MODEL  # a new database: no collection to take the model from
    if model is not None:  # load it before the database is created: a bad --model leaves nothing behind
        cached_encoder(model, args.dtype, device)

    def attempt() -> MultimodalCollection:
        client = make_client(location)
        name = resolve_model(model, client, args.collection)
        return MultimodalCollection(name, encoder=cached_encoder(name, args.dtype, device), client=client,
                                    collection=args.collection, dtype=args.dtype, device=device,
                                    batch_size=args.batch_size, allow_model_change=args.allow_model_change,
                                    modality_index=True if args.modality_index else None)

    if shard.grouped:  # the first process creates the collection, the others open it
        collection = attempt() if shard.rank == 0 else None
        shard.barrier()
        collection = collection or attempt()
        collection.check_model()  # every process reads before any writes (Chroma races a read on a new segment)
        shard.barrier()
        return collection
    for remaining in range(_OPEN_ATTEMPTS - 1, -1, -1):
        try:
            return attempt()
        except StoreError:
            if shard.world_size == 1 or not remaining:
                raise
            logger.info("opening the collection failed (another process creating it?); retrying")
            time.sleep(0.5)
    raise AssertionError("unreachable")


def _write(collection: Any, scan: Scan, args: argparse.Namespace, shard: Shard,
           mine: int) -> tuple[list[str], Counter]:
    """This process's share of the items, in one streaming ``add`` call (all-or-nothing, pipelined)."""
    from mmembed_rag.modality import modality

    modalities: Counter = Counter()
    # add() pulls an item, then its metadata: each entry's metadata waits here for exactly one pull.
    pending: deque[dict[str, Any]] = deque()

    def items() -> Iterator[Any]:
        for ordinal, entry in enumerate(_entries(scan, args)):
            if shard.owns(ordinal):
                modalities[modality(entry.item)] += 1
                pending.append(entry.metadata)
                yield entry.item

    def metadata_stream() -> Iterator[dict[str, Any]]:
        while pending:
            yield pending.popleft()

    ids = collection.add(items(), metadatas=metadata_stream(), chunk_size=args.chunk_size,
                         show_progress=not args.no_progress and mine > 0)
    return list(dict.fromkeys(ids)), modalities


def _report(args: argparse.Namespace, location: StoreLocation, collection: Any, scan: Scan, total: int,
            ranks: list[dict[str, Any]], count: int, world: int) -> dict[str, Any]:
    modalities: Counter = Counter()
    for entry in ranks:
        modalities.update(entry["modalities"])
    files = Counter(file_kind(path) for path in scan.files)
    return {"collection": args.collection, "store": str(location), "model": collection.embedding_function.model,
            "world_size": world, "files": {kind: files.get(kind, 0) for kind in ("image", "text", "jsonl")},
            "total_items": total, "items": sum(entry["items"] for entry in ranks),
            "distinct": len({id_ for entry in ranks for id_ in entry["ids"]}),
            "modalities": dict(modalities), "skipped": len(scan.skipped),
            "skipped_files": [str(path) for path in scan.skipped], "count": count, "ranks": ranks}


def _print(report: dict[str, Any], shard: Shard) -> None:
    files = report["files"]
    kinds = ", ".join(f"{n} {name}" for name, n in report["modalities"].items() if n)
    distinct = f", {report['distinct']} distinct" if report["distinct"] != report["items"] else ""
    print(f"indexed {report['items']} item(s) ({kinds}{distinct}) from {sum(files.values())} file(s) "
          f"({files['image']} image, {files['text']} text, {files['jsonl']} jsonl) into collection "
          f"{report['collection']!r} at {report['store']}")
    if report["world_size"] > 1:
        for entry in report["ranks"]:
            print(f"  rank {entry['rank']}/{report['world_size']}: {entry['items']} item(s) in {entry['seconds']} s")
        if not shard.grouped:
            print(f"  (this process's share of {report['total_items']} item(s); the others report their own)")
    if report["skipped"]:
        names = [Path(p).name for p in report["skipped_files"]]
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        print(f"skipped {report['skipped']} unsupported file(s): {', '.join(names[:5])}{more}")
    print(f"collection {report['collection']!r} now holds {report['count']} item(s)")
