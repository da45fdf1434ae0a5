"""Chroma clients: an embedded database, a (possibly secured) server, or a client the caller built.

Credentials are passed to chromadb's own client auth provider and are never logged nor put in an error message.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import chromadb
from chromadb.api import ClientAPI
from chromadb.config import Settings
from chromadb.errors import ChromaError

from .errors import StoreError

__all__ = ["TOKEN_HEADERS", "make_client", "check_writable", "max_batch_size"]

logger = logging.getLogger(__name__)

#: The headers chromadb's token auth provider can send a token in.
TOKEN_HEADERS = ("Authorization", "X-Chroma-Token")
_TOKEN_PROVIDER = "chromadb.auth.token_authn.TokenAuthClientProvider"


def make_client(client: ClientAPI | None = None, persist_dir: str | os.PathLike | None = None,
                host: str | None = None, port: int | None = None, *, ssl: bool = False,
                headers: Mapping[str, str] | None = None, auth_token: str | None = None,
                auth_header: str = "Authorization") -> ClientAPI:
    """A Chroma client for the arguments of :class:`~mmembed_rag.store.MultimodalCollection`.

    Args:
        client: an existing client (any kind, e.g. one built with custom ``Settings``); excludes the others.
        persist_dir: an embedded, persistent database directory.
        host, port: a Chroma server (default port 8000).
        ssl: connect to the server over HTTPS.
        headers: extra HTTP headers for every request to the server.
        auth_token: a token for chromadb's token authentication (sent as ``Authorization: Bearer <token>`` or in
            ``X-Chroma-Token``, see ``auth_header``).
        auth_header: ``"Authorization"`` or ``"X-Chroma-Token"``.

    With neither ``client``, ``persist_dir`` nor ``host``/``port``, the database lives in memory.

    Raises:
        StoreError: conflicting arguments, server options without a server, an unwritable ``persist_dir``
            (naming it), or no server answering (naming the address, never the credentials).
    """
    remote = host is not None or port is not None
    if client is not None and (persist_dir is not None or remote):
        raise StoreError("pass either client or persist_dir/host/port, not both")
    if persist_dir is not None and remote:
        raise StoreError("pass either persist_dir (embedded database) or host/port (Chroma server), not both")
    server_options = [name for name, given in (("ssl", ssl), ("headers", headers), ("auth_token", auth_token))
                      if given]
    if server_options and not remote:
        raise StoreError(f"{', '.join(server_options)} apply to a Chroma server: pass host=/port= too"
                         + (" (or build the client with them and pass client=)" if client is not None else ""))
    if auth_header not in TOKEN_HEADERS:
        raise StoreError(f"auth_header must be one of {', '.join(TOKEN_HEADERS)}, got {auth_header!r}")
    if client is not None:
        return client
    if remote:
        return _http_client(host or "localhost", port or 8000, ssl, headers, auth_token, auth_header)
    if persist_dir is not None:
        path = Path(persist_dir).expanduser()
        check_writable(path)
        try:
            return chromadb.PersistentClient(path=str(path))
        except ChromaError as exc:
            raise StoreError(f"cannot open the Chroma database at {path}: {exc}") from exc
    return chromadb.EphemeralClient()


def _http_client(host: str, port: int, ssl: bool, headers: Mapping[str, str] | None, auth_token: str | None,
                 auth_header: str) -> ClientAPI:
    if headers is not None and (not isinstance(headers, Mapping)
                                or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
        raise StoreError("headers must be a dict of str to str")
    if auth_token is not None and (not isinstance(auth_token, str) or not auth_token.strip()):
        raise StoreError("auth_token must be a non-empty string")
    settings = Settings()
    if auth_token is not None:
        settings = Settings(chroma_client_auth_provider=_TOKEN_PROVIDER, chroma_client_auth_credentials=auth_token,
                            chroma_auth_token_transport_header=auth_header)
    scheme = "https" if ssl else "http"
    try:
        client = chromadb.HttpClient(host=host, port=port, ssl=ssl, headers=dict(headers or {}), settings=settings)
    except (ValueError, ChromaError) as exc:  # raised when no server answers, or it refuses the credentials
        raise StoreError(f"cannot reach a Chroma server at {host}:{port}{' (https)' if ssl else ''}: "
                         f"{_redact(str(exc), auth_token, headers)}") from None
    logger.debug("connected to the Chroma server at %s://%s:%s (token auth: %s)", scheme, host, port,
                 "yes" if auth_token else "no")
    return client


def _redact(text: str, token: str | None, headers: Mapping[str, str] | None) -> str:
    """``text`` without any secret it might echo (the token, header values)."""
    for secret in [token, *(headers or {}).values()]:
        if secret:
            text = text.replace(secret, "***")
    return text


def check_writable(path: Path) -> None:
    """Refuse a database directory this process cannot write (chromadb fails there with a bare InternalError,
    and a retry in the same process with ``AttributeError: 'RustBindingsAPI'``).

    Raises:
        StoreError: naming ``path`` and what is wrong with it.
    """
    existing = path
    try:
        while not existing.exists():
            if existing.parent == existing:
                break
            existing = existing.parent
    except OSError as exc:  # a folder on the way cannot be searched
        raise StoreError(f"cannot use {path} as a Chroma database directory: {exc.strerror or exc} "
                         f"({exc.filename})") from exc
    if existing.exists() and not existing.is_dir():
        raise StoreError(f"cannot use {path} as a Chroma database directory: {existing} is not a directory")
    files = [existing] + ([existing / "chroma.sqlite3"] if existing == path else [])
    for target in files:
        if target.exists() and not _writable(target):
            what = "database file" if target.is_file() else "directory"
            raise StoreError(f"cannot write the Chroma database at {path}: the {what} {target} is read-only "
                             "for this process")


def _writable(path: Path) -> bool:
    if os.access in os.supports_effective_ids:
        return os.access(path, os.W_OK, effective_ids=True)
    return os.access(path, os.W_OK)


def max_batch_size(store: Any) -> int | None:
    """The per-call record limit of the Chroma client behind ``store``, or ``None`` when ``store`` is not Chroma.

    ``store``: a chromadb ``Collection``, LlamaIndex's ``ChromaVectorStore`` or ``langchain_chroma.Chroma``.

    None of chromadb 1.5, llama-index-vector-stores-chroma or langchain-chroma exposes the limit, or the client
    that knows it, publicly: a ``Collection`` keeps its client in ``_client``, ``ChromaVectorStore`` hands out
    the collection as ``client``, ``langchain_chroma.Chroma`` keeps it in ``_collection``. This function is
    the one place in the library that reads those attributes.
    """
    collection = _chroma_collection(store)
    client = getattr(collection, "_client", None) if collection is not None else None
    return client.get_max_batch_size() if client is not None else None


def _chroma_collection(store: Any) -> Any:
    from chromadb.api.models.CollectionCommon import CollectionCommon

    if isinstance(store, CollectionCommon):
        return store
    for attribute in ("client", "_collection"):  # ChromaVectorStore.client, langchain_chroma.Chroma._collection
        candidate = getattr(store, attribute, None)
        if isinstance(candidate, CollectionCommon):
            return candidate
    return None
