"""What the commands share: the usage error, where the Chroma store is, opening it, and printing."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmembed_rag.errors import MMEmbedError
from mmembed_rag.modality import MODALITIES, modality

if TYPE_CHECKING:  # chromadb is an extra: imported by the commands that need it
    from chromadb.api import ClientAPI

    from mmembed_rag.results import RankedItem

__all__ = ["DEFAULT_PERSIST_DIR", "DEFAULT_RERANKER", "MODALITIES", "UsageError", "require_collection",
           "local_image", "print_ranked", "StoreLocation", "store_location", "make_client",
           "persisted_model", "resolve_model", "item_json", "emit_json", "one_line", "positive_int",
           "non_negative_int", "TOKEN_ENV"]

logger = logging.getLogger(__name__)

DEFAULT_PERSIST_DIR = "./mmembed_chroma"
DEFAULT_RERANKER = "llava-hf/llava-v1.6-mistral-7b-hf"
#: Environment variable the Chroma server token is read from (never a command-line argument, never logged).
TOKEN_ENV = "MMEMBED_CHROMA_TOKEN"
_SHOWN_KEYS = frozenset({"modality", "image_uri"})  # store metadata that item_json shows as fields already
DEFAULT_CHROMA_PORT = 8000


class UsageError(MMEmbedError, ValueError):
    """The command line or its inputs are wrong (missing path, conflicting options...): exit status 2."""


class StoreLocation:
    """Either an embedded database directory or a Chroma server address (with its connection options).

    Args:
        persist_dir: directory of an embedded (SQLite, single-writer) database.
        host, port: a Chroma server.
        ssl: connect over HTTPS.
        token: a token for the server's token authentication (from :data:`TOKEN_ENV`; never printed).
        auth_header: the header the token travels in (``Authorization`` or ``X-Chroma-Token``).
    """

    def __init__(self, persist_dir: str | None = None, host: str | None = None, port: int | None = None,
                 ssl: bool = False, token: str | None = None, auth_header: str = "Authorization") -> None:
        self.persist_dir = persist_dir
        self.host = host
        self.port = port
        self.ssl = ssl
        self.token = token
        self.auth_header = auth_header

    @property
    def remote(self) -> bool:
        """True for a Chroma server."""
        return self.host is not None

    def __str__(self) -> str:
        return f"{'https' if self.ssl else 'http'}://{self.host}:{self.port}" if self.remote else str(self.persist_dir)

    def __repr__(self) -> str:  # never shows the token
        return f"StoreLocation({str(self)!r}, token={'set' if self.token else None})"


def store_location(args: argparse.Namespace) -> StoreLocation:
    """The store the global options name: ``--host/--port`` (a server) or ``--persist-dir`` (default).

    A server token is read from the environment variable :data:`TOKEN_ENV` (``--token-env`` names another one).

    Raises:
        UsageError: conflicting options, or server options without a server.
    """
    token_env = getattr(args, "token_env", None) or TOKEN_ENV
    token = os.environ.get(token_env) or None
    ssl = bool(getattr(args, "ssl", False))
    if args.host is not None or args.port is not None:
        if args.persist_dir is not None:
            raise UsageError("--persist-dir (embedded database) and --host/--port (Chroma server) exclude each "
                             "other; pass one of them")
        return StoreLocation(host=args.host or "localhost", port=args.port or DEFAULT_CHROMA_PORT, ssl=ssl,
                             token=token, auth_header=getattr(args, "auth_header", None) or "Authorization")
    if ssl:
        raise UsageError("--ssl applies to a Chroma server: pass --host/--port too")
    if getattr(args, "token_env", None) and token:
        raise UsageError(f"a token is set in ${token_env} but no server is named: pass --host/--port")
    return StoreLocation(persist_dir=args.persist_dir or DEFAULT_PERSIST_DIR)


def make_client(location: StoreLocation, must_exist: bool = False) -> ClientAPI:
    """A Chroma client for ``location``.

    Args:
        location: where the store is.
        must_exist: refuse an embedded database directory that does not exist yet (searching it is a mistake).

    Raises:
        UsageError: ``must_exist`` and no database at ``location.persist_dir``.
        StoreError: no Chroma server answers at ``location``, or the database directory cannot be written.
    """
    import mmembed_rag.store  # noqa: F401  (registers the "mmembed" embedding function with Chroma)
    from mmembed_rag.store.connection import make_client as store_client

    if location.remote:
        return store_client(host=location.host, port=location.port, ssl=location.ssl, auth_token=location.token,
                            auth_header=location.auth_header)
    if must_exist and not Path(location.persist_dir).is_dir():
        raise UsageError(f"no index at {location.persist_dir}: run `mmembed-rag index PATH...` first, or pass "
                         "--persist-dir (or --host/--port) to name the store")
    return store_client(persist_dir=location.persist_dir)


def persisted_model(client: ClientAPI, collection: str) -> str | None:
    """The model a collection was built with (its ``mmembed`` embedding-function config), or ``None``."""
    from chromadb.errors import NotFoundError

    try:
        config = client.get_collection(collection).configuration_json or {}
    except (NotFoundError, ValueError):
        return None
    function = config.get("embedding_function") or {}
    if function.get("name") != "mmembed":
        return None
    return (function.get("config") or {}).get("model")


def require_collection(client: ClientAPI, collection: str, location: StoreLocation) -> None:
    """Refuse to search a collection that does not exist (opening it would create an empty one).

    Raises:
        UsageError: naming the collections the store does hold.
    """
    names = sorted(c if isinstance(c, str) else c.name for c in client.list_collections())
    if collection not in names:
        held = f"it holds {', '.join(map(repr, names))}" if names else "it holds no collection"
        raise UsageError(f"no collection {collection!r} at {location} ({held}); index into it first or pass "
                         "--collection NAME")


def local_image(path: str, what: str) -> str:
    """An image argument: URLs pass as given, local paths must be files (returned absolute).

    Raises:
        UsageError: ``path`` is not an existing file.
    """
    if "://" in path:
        return path
    file = Path(path).expanduser()
    if not file.is_file():
        raise UsageError(f"{what} {path}: no such file")
    return str(file.resolve())


def resolve_model(requested: str | None, client: ClientAPI, collection: str) -> str:
    """``--model`` when given, else the model the collection was built with, else ``nvidia/MM-Embed``.

    Searching a collection with another model than the one that wrote it ranks noise, so without ``--model``
    the collection's own model is used (the store logs a warning when an explicit ``--model`` differs).
    """
    from mmembed_rag.hub import DEFAULT_MODEL

    if requested is not None:
        return requested
    model = persisted_model(client, collection)
    if model is not None:
        logger.info("using the collection's model %s", model)
    return model or DEFAULT_MODEL


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def item_json(hit: RankedItem) -> dict[str, Any]:
    """The fields of a ranked item that a script needs: text, image reference, id and metadata."""
    image = hit.item.image
    out: dict[str, Any] = {"modality": modality(hit.item), "text": hit.item.text,
                           "image": None if image is None else str(image)}
    if hit.id is not None:
        out["id"] = hit.id
    metadata = {key: value for key, value in (hit.metadata or {}).items() if key not in _SHOWN_KEYS}
    if metadata:
        out["metadata"] = metadata
    return out


def emit_json(document: Any) -> None:
    """Write one JSON document to stdout (the ``--json`` contract)."""
    sys.stdout.write(json.dumps(document, ensure_ascii=False, sort_keys=False) + "\n")
    sys.stdout.flush()


def one_line(text: str | None, width: int = 90) -> str:
    """``text`` on one line, shortened to ``width`` characters."""
    if text is None:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def print_ranked(rows: list[dict[str, Any]], extra: str | None = None) -> None:
    """Print ranked rows (``rank``, ``score``, ``text``, ``image``, optional ``extra`` score) as a table."""
    if not rows:
        print("no results")
        return
    header = f"{'#':>3}  {'score':>8}" + (f"  {extra.split('_')[0]:>9}" if extra else "") + f"  {'modality':<10}  item"
    print(header)
    for row in rows:
        line = f"{row['rank']:>3}  {row['score']:>8.4f}"
        if extra:
            line += f"  {row[extra]:>9.4f}" if row.get(extra) is not None else f"  {'':>9}"
        shown = [part for part in (row["image"], one_line(row["text"], 80 if row["image"] else 100)) if part]
        source = (row.get("metadata") or {}).get("source")
        if source and not row["image"]:
            shown.append(f"[{Path(source).name}]")
        print(f"{line}  {row['modality']:<10}  {'  '.join(shown)}")
