"""LlamaIndex nodes, queries and images to :class:`~mmembed_rag.items.MultimodalItem`, shared by the adapter's files.

Images are mapped, not loaded, here: the Encoder or reranker loads them lazily, with its URL timeout and size limits.
"""

from __future__ import annotations

from io import BytesIO
from types import SimpleNamespace
from typing import Any

from llama_index.core.schema import BaseNode, ImageNode, MetadataMode, Node, QueryBundle

from mmembed_rag.errors import InvalidItemError
from mmembed_rag.items import MultimodalItem
from mmembed_rag.modality import modality

__all__ = ["image_source", "index_embed_model", "node_item", "node_modality", "query_item"]


def index_embed_model(index: Any) -> Any:
    """The embedding model an index was built with (``None`` if it has none).

    LlamaIndex keeps it only in the private ``_embed_model`` (no public accessor in llama-index-core 0.14, and its
    own retrievers read it the same way); this is the one place the adapter does.
    """
    return getattr(index, "_embed_model", None)


def image_source(image: Any) -> Any:
    """``BytesIO`` (upstream's resolve_image result) to bytes; paths, URLs, data URIs pass through."""
    return image.getvalue() if isinstance(image, BytesIO) else image


def query_item(text: str | None, image: Any, bundle: QueryBundle | None = None) -> MultimodalItem:
    """A text, image or composed query as one item; errors name the ``QueryBundle`` when there is one."""
    try:
        return MultimodalItem(text=text or None, image=image_source(image) if image is not None else None)
    except InvalidItemError as exc:
        what = f"QueryBundle(query_str={bundle.query_str!r}, image_path={bundle.image_path!r})" if bundle else (
            f"query (text={text!r}, image={image!r})")
        raise InvalidItemError(f"{what}: {exc}") from exc


def node_item(node: BaseNode) -> MultimodalItem:
    """A node as one item: its text, its image, or both (an image node's text only when it has any)."""
    text, image = _node_parts(node)
    try:
        return MultimodalItem(text=text, image=image)
    except InvalidItemError as exc:
        raise InvalidItemError(f"node {node.node_id!r}: {exc}") from exc


def _node_parts(node: BaseNode) -> tuple[str | None, str | None]:
    image = _node_image(node)
    has_text = image is None or bool(node.get_content(metadata_mode=MetadataMode.NONE).strip())
    return (node.get_content(metadata_mode=MetadataMode.EMBED) if has_text else None), image


def node_modality(node: BaseNode) -> str:
    """The node's modality as :func:`node_item` embeds it, also for nodes that carry their own embedding."""
    text, image = _node_parts(node)
    return modality(SimpleNamespace(text=text, image=image))


def _node_image(node: BaseNode) -> str | None:
    if isinstance(node, ImageNode):
        data, path, url, mime = node.image, node.image_path, node.image_url, node.image_mimetype
    elif isinstance(node, Node) and node.image_resource is not None:
        res = node.image_resource
        data, mime = (res.data.decode("ascii") if res.data else None), res.mimetype
        path, url = (str(res.path) if res.path else None), (str(res.url) if res.url else None)
    else:
        return None
    if data:
        return f"data:{mime or 'image'};base64,{data}"
    return path or url
