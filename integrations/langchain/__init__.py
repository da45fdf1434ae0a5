"""LangChain adapter: MM-Embed ``Embeddings``, a multimodal ``BaseRetriever`` over Chroma, and an MLLM reranker.

Install with ``pip install "mmembed-rag[langchain]"``. The classes only translate LangChain objects into
:class:`~mmembed_rag.items.MultimodalItem` and call the :class:`~mmembed_rag.encoder.Encoder` or the
:class:`~mmembed_rag.reranker.MLLMReranker`, which own batching, prompts, image loading, devices and dtypes.

:class:`MMEmbedReranker` is a ``BaseDocumentCompressor``: it works in ``ContextualCompressionRetriever``, but that
class forwards only the query *string*. For image and composed queries give the reranker to the retriever:
``MMEmbedRetriever(..., reranker=MMEmbedReranker(...))`` reranks its hits with the full query.

Upstream ``langchain_chroma.Chroma`` behaviour worth knowing (not changed here):

* ``Chroma.add_images(uris)`` opens each uri itself as a *local file* (``FileNotFoundError`` for a missing
  one, before anything is embedded), stores the file's base64 as the document's ``page_content``, then calls
  :meth:`MMEmbedEmbeddings.embed_image` with the same uris and upserts everything in one call, so more than
  ``client.get_max_batch_size()`` images (5461 with chromadb 1.5) in one call fail, after all are embedded.
  :meth:`MMEmbedRetriever.add_images` writes in chunks under that limit (removing what it added if a chunk
  fails) and records each uri under ``metadata["image"]`` and ``metadata["modality"] = "image"``.
* ``Chroma.similarity_search_by_image(uri)`` embeds the query image with ``embed_image``, i.e. as a
  document (no ``Query:`` prompt, no instruction). For instructed image queries use :class:`MMEmbedRetriever`.
* A collection's default space is *squared* L2; upstream's relevance function assumes plain L2, so
  ``similarity_search_with_relevance_scores`` is not cosine. The retriever converts distances exactly.

Example:
    >>> emb = MMEmbedEmbeddings(model="nvidia/MM-Embed", query_instruction="mscoco_t2i")
    >>> retriever = MMEmbedRetriever(vectorstore=Chroma("photos", embedding_function=emb, persist_directory="db"))
    >>> retriever.add_images(["cat.png", "dog.png"])
    >>> docs = retriever.invoke("the same but in red", image="red_car.png", k=1)
    >>> retriever.reranker = MMEmbedReranker(model="llava-hf/llava-v1.6-mistral-7b-hf", top_n=3)
    >>> docs = retriever.invoke("the same but in red", image="red_car.png", k=20)  # 20 retrieved, best 3 kept
"""

from __future__ import annotations

from mmembed_rag.errors import MissingDependencyError

try:  # the one check for the extra; the files below import langchain_core freely
    import langchain_core  # noqa: F401
    import pydantic  # noqa: F401
except ImportError as exc:
    raise MissingDependencyError(
        "mmembed_rag.integrations.langchain needs langchain-core; install it with: "
        'pip install "mmembed-rag[langchain]"'
    ) from exc

from ._common import IMAGE_KEY, RELEVANCE_KEY, RERANK_KEY, SCORE_KEY
from .embeddings import MMEmbedEmbeddings
from .rerank import MMEmbedReranker
from .retriever import MMEmbedRetriever

__all__ = ["IMAGE_KEY", "RELEVANCE_KEY", "RERANK_KEY", "SCORE_KEY", "MMEmbedEmbeddings", "MMEmbedReranker",
           "MMEmbedRetriever"]
