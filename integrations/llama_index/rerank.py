"""Zero-shot MLLM reranking of LlamaIndex nodes as a node postprocessor."""

from __future__ import annotations

import os
from typing import Any, Literal

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle

from mmembed_rag.errors import InvalidItemError
from mmembed_rag.items import MultimodalItem
from mmembed_rag.options import RERANKER_OPTIONS, Shared, adapter_model
from mmembed_rag.rerank_templates import RerankTemplate, get_template
from mmembed_rag.reranker import MLLMReranker, combine_ranked
from mmembed_rag.reranker_base import Reranker

from ._common import node_item, query_item

__all__ = ["MMEmbedRerank", "RerankedNode"]


class RerankedNode(NodeWithScore):
    """What :class:`MMEmbedRerank` returns: ``score`` is the final score; ``node`` is the caller's node, unchanged."""

    rerank_score: float = Field(description='The reranker\'s P("True") for the node.')
    retrieval_score: float | None = Field(default=None, description="The score the node came in with.")

    @classmethod
    def class_name(cls) -> str:
        return "RerankedNode"


class MMEmbedRerank(BaseNodePostprocessor):
    """Zero-shot MLLM reranking of text, image and text+image nodes for a text, image or composed query.

    Each node becomes one candidate as it does for embedding (text; ``ImageNode`` image from ``image``
    (base64), ``image_path`` or ``image_url``, plus its text when it has any); the query is the bundle's
    ``query_str`` and ``image_path`` (both: a composed query). :meth:`Reranker.rerank` scores them.

    Scores: ``combine=None`` (default): P("True"). ``"multiply"``: P("True") × the node's incoming score (with a
    negative incoming score the product favours low P("True"), so prefer ``"weighted"`` there).
    ``"weighted"``: ``weight * P("True") + (1 - weight) * incoming score`` (from :class:`MMEmbedRetriever`,
    the cosine similarity). Ties keep the incoming order. Each result is a :class:`RerankedNode` holding the
    caller's node object (neither copied nor modified) with ``rerank_score`` and ``retrieval_score``.

    Args:
        model: hub id or local directory of a reranker (LLaVA-NeXT or Qwen3-VL), loaded when ``reranker`` is not given.
        reranker: an already loaded reranker (``MLLMReranker.from_pretrained``) (then leave ``device``, ``dtype`` and
            the loading keys of ``encoder_kwargs`` unset).
        **kwargs: the fields below (``top_n``, ``template``, ``combine``, ``weight``, ``batch_size``,
            ``encoder_kwargs``...).

    Raises:
        TemplateError: unknown template name. ValueError: ``device``/``dtype``/``encoder_kwargs`` given with
            ``reranker``, or a bad ``encoder_kwargs`` key.
    """

    model: str = Field(default="llava-hf/llava-v1.6-mistral-7b-hf", description="Hub id or local directory.")
    top_n: int = Field(default=5, ge=1, description="Nodes kept (all when fewer).")
    template: str | RerankTemplate | None = Field(
        default=None, description="LLaVA-NeXT rerankers: built-in template name or RerankTemplate; None: the "
        "reranker's own choice.")
    instruction: str | None = Field(
        default=None, description="Qwen3-VL rerankers: the task instruction; None: the checkpoint family's default.")
    combine: Literal["multiply", "weighted"] | None = Field(
        default=None, description="How to mix P(True) with the incoming score; None keeps P(True).")
    weight: float = Field(default=0.5, ge=0.0, le=1.0, description='Weight of P("True") when combine="weighted".')
    batch_size: int = Field(default=16, ge=1, description="Candidates per forward pass.")
    device: str | None = Field(default=None, description="Device when loading `model`.")
    dtype: str | None = Field(default=None, description="Weights dtype when loading `model`.")
    encoder_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Reranker options: max_length, max_image_pixels, url_timeout (when "
        "loading `model`) and batch_size (same as the `batch_size` field).")
    _reranker: Shared[Reranker] = PrivateAttr()

    def __init__(self, model: str | os.PathLike = "llava-hf/llava-v1.6-mistral-7b-hf",
                 reranker: Reranker | None = None, **kwargs: Any) -> None:
        super().__init__(model=str(model), **kwargs)
        if self.template is not None:
            get_template(self.template)  # a mistyped name fails now, not at the first query
        self._reranker, self.batch_size = adapter_model(
            MLLMReranker.from_pretrained, self.model, reranker, self.encoder_kwargs, allowed=RERANKER_OPTIONS,
            batch_size=self.batch_size, batch_size_given="batch_size" in kwargs, what="reranker", device=self.device,
            dtype=self.dtype)

    @classmethod
    def class_name(cls) -> str:
        return "MMEmbedRerank"

    @property
    def reranker(self) -> Reranker:
        """The wrapped Reranker (shared, never copied, by copies of this postprocessor)."""
        return self._reranker.value

    def _postprocess_nodes(self, nodes: list[NodeWithScore],
                           query_bundle: QueryBundle | None = None) -> list[RerankedNode]:
        if query_bundle is None:
            raise ValueError("MMEmbedRerank needs the query: pass query_bundle=QueryBundle(...) or query_str=...")
        if isinstance(nodes, NodeWithScore):
            raise InvalidItemError("nodes must be a list of NodeWithScore, got a single NodeWithScore")
        nodes = list(nodes)
        query = query_item(query_bundle.query_str, query_bundle.image_path or None, query_bundle)
        ranked = self.reranker.rerank(query, [_candidate(i, hit) for i, hit in enumerate(nodes)],
                                      batch_size=self.batch_size, template=self.template,
                                      instruction=self.instruction)
        kept = combine_ranked(ranked, [hit.score for hit in nodes], self.combine, self.weight, self.top_n)
        return [RerankedNode(node=nodes[r.index].node, rerank_score=r.score, retrieval_score=nodes[r.index].score,
                             score=score) for r, score in kept]


def _candidate(index: int, hit: Any) -> MultimodalItem:
    if not isinstance(hit, NodeWithScore):
        raise InvalidItemError(f"candidate {index}: expected a NodeWithScore, got {type(hit).__name__}")
    try:
        return node_item(hit.node)
    except InvalidItemError as exc:
        raise InvalidItemError(f"candidate {index}: {exc}") from exc
