"""LlamaIndex adapter: a multimodal MM-Embed embedding, a one-collection ingest path, a retriever and a reranker.

Which path to use:

* **One collection (recommended).** MM-Embed puts text, images and text+image pairs in ONE space, so one vector
  store holds them all. ``build_index(nodes, embed_model, vector_store)`` (or :func:`add_nodes` on an existing
  ``VectorStoreIndex``) embeds ``TextNode`` / ``Document`` as text and ``ImageNode`` / ``ImageDocument`` as its
  image (plus its text, if any, as one text+image item), then writes chunks no larger than Chroma's
  ``client.get_max_batch_size()``; a failure rolls back what the call wrote. Every stored node carries
  ``metadata["modality"]``; query with :class:`MMEmbedRetriever` (``modality="image"`` filters in the store).
* **Upstream two stores.** ``MultiModalVectorStoreIndex(nodes, storage_context=StorageContext.from_defaults(
  vector_store=text_store, image_store=image_store), embed_model=emb, image_embed_model=emb)`` works as documented
  upstream for small corpora, and :class:`MMEmbedRetriever` merges both stores by cosine. But it hands ALL text nodes
  (then all image nodes) to one ``vector_store.add`` call (its ``_add_nodes_to_index`` drops the base class's
  ``insert_batch_size`` loop), and ``ChromaVectorStore.add`` splits only at a hard-coded ``MAX_CHUNK_SIZE = 41665``
  instead of asking the client, whose embedded limit is 5,461 records per call: more than 5,461 nodes of one kind
  fail with ``InternalError: Batch size ... greater than max batch size of 5461``, after every embedding was computed
  and possibly with the text store already written. It also skips nodes whose ``get_content(EMBED)`` is empty, i.e.
  image-only ``ImageNode`` s without metadata.
* Plain ``VectorStoreIndex(nodes, embed_model=emb)`` embeds node *text* only: image-only ``ImageNode`` s are skipped
  or embedded as their metadata text. Use :func:`build_index`.

Reranking: :class:`MMEmbedRerank` is a node postprocessor that scores each retrieved node with the zero-shot MLLM
reranker (:class:`~mmembed_rag.reranker.MLLMReranker`) against the whole ``QueryBundle``: text, ``image_path`` or
both. Query engines hand postprocessors the bundle they were given, but paths that rebuild it from ``query_str``
lose the image; ``MMEmbedRetriever(index, reranker=MMEmbedRerank(...))`` reranks inside the retriever, with the
bundle it searched with.

Scores: ``ChromaVectorStore`` reports ``exp(-distance)``; :class:`MMEmbedRetriever` turns that back into the cosine
similarity for the collection's space (``l2``, ``cosine`` or ``ip``). Other stores' similarities pass through
(``SimpleVectorStore`` already reports cosine).

Images are mapped, not loaded, here: node fields (base64 ``image``, ``image_path``, ``image_url``) and upstream's
``resolve_image()`` results (path str or ``BytesIO``) become item images that the Encoder loads lazily, with its URL
timeout and size limits. We do not call ``ImageNode.resolve_image()`` ourselves: it downloads URLs eagerly with no
size cap and decodes base64 without naming the node.

Example:
    >>> emb = MMEmbedEmbedding(encoder=Encoder.from_pretrained("nvidia/MM-Embed"), query_instruction="mscoco_t2i")
    >>> store = ChromaVectorStore(chroma_collection=chromadb.PersistentClient("db").get_or_create_collection("kb"))
    >>> index = build_index(nodes, emb, store)
    >>> hits = MMEmbedRetriever(index, similarity_top_k=5).retrieve(QueryBundle("the same but red", image_path="a.png"))
    >>> rerank = MMEmbedRerank(model="llava-hf/llava-v1.6-mistral-7b-hf", top_n=3, combine="weighted", weight=0.7)
    >>> retriever = MMEmbedRetriever(index, similarity_top_k=20, reranker=rerank)
    >>> best = retriever.retrieve(QueryBundle("the same but red", image_path="a.png"))
"""

from __future__ import annotations

from mmembed_rag.errors import MissingDependencyError

try:  # the one check for the extra; the files below import llama_index freely
    import llama_index.core  # noqa: F401
except ImportError as exc:
    raise MissingDependencyError(
        'mmembed_rag.integrations.llama_index needs llama-index-core; install it with: '
        'pip install "mmembed-rag[llama-index]"'
    ) from exc

from .embedding import MMEmbedEmbedding
from .ingest import add_nodes, build_index
from .rerank import MMEmbedRerank, RerankedNode
from .retriever import MMEmbedRetriever

__all__ = ["MMEmbedEmbedding", "MMEmbedRerank", "MMEmbedRetriever", "RerankedNode", "add_nodes", "build_index"]
