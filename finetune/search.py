"""Exact top-k inner-product search over a candidate pool, scored in chunks.

Mining and evaluation both rank a pool of embeddings for many queries. Scoring every query against a
100,000-candidate pool at once would need a (queries x pool) score matrix; :func:`top_k_search` scores
``chunk_size`` candidates (and ``query_batch`` queries) at a time and keeps a running top-k, so the
extra memory is ``query_batch x (chunk_size + k)`` scores whatever the pool size.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["top_k_search"]


def top_k_search(query_emb: np.ndarray | torch.Tensor, pool_emb: np.ndarray | torch.Tensor, k: int, *,
                 chunk_size: int = 50_000, query_batch: int = 1024,
                 device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` pool rows for every query by inner product (cosine on L2-normalised rows).

    Args:
        query_emb: (n_queries, dim) query embeddings.
        pool_emb: (n_pool, dim) candidate embeddings.
        k: results per query; capped at ``n_pool``.
        chunk_size: candidates scored at a time.
        query_batch: queries scored at a time.
        device: where to score (default CPU); e.g. ``"cuda"`` for large pools. Chunks are moved there one
            at a time, so the pool itself may stay in host memory.

    Returns:
        ``(scores, indices)``, both (n_queries, min(k, n_pool)): float32 scores, best first, and int64 row
        indices into ``pool_emb``. Among equal scores the order is unspecified.

    Raises:
        ValueError: non-positive ``k``/``chunk_size``/``query_batch`` or mismatched dimensions.

    Example:
        >>> scores, idx = top_k_search(q, pool, k=10, chunk_size=4096)
    """
    if k < 1 or chunk_size < 1 or query_batch < 1:
        raise ValueError(f"k, chunk_size and query_batch must be >= 1, got {k}, {chunk_size}, {query_batch}")
    queries = torch.as_tensor(query_emb, dtype=torch.float32)
    pool = torch.as_tensor(pool_emb, dtype=torch.float32)
    if queries.ndim != 2 or pool.ndim != 2 or queries.shape[1] != pool.shape[1]:
        raise ValueError(f"expected (n, d) and (m, d) embeddings, got {tuple(queries.shape)} and {tuple(pool.shape)}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    k = min(k, pool.shape[0])
    n = queries.shape[0]
    out_scores = np.empty((n, k), dtype=np.float32)
    out_index = np.empty((n, k), dtype=np.int64)
    if k == 0 or n == 0:
        return out_scores, out_index
    for q0 in range(0, n, query_batch):
        block = queries[q0:q0 + query_batch].to(device)
        best_scores = torch.full((block.shape[0], 0), float("-inf"), device=device)
        best_index = torch.zeros((block.shape[0], 0), dtype=torch.long, device=device)
        for c0 in range(0, pool.shape[0], chunk_size):
            chunk = pool[c0:c0 + chunk_size].to(device)
            scores = block @ chunk.T
            top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
            # Merge the chunk's best with the running best: only 2k columns are ever sorted.
            merged_scores = torch.cat([best_scores, top.values], dim=1)
            merged_index = torch.cat([best_index, top.indices + c0], dim=1)
            keep = torch.topk(merged_scores, min(k, merged_scores.shape[1]), dim=1)
            best_scores = keep.values
            best_index = torch.gather(merged_index, 1, keep.indices)
        out_scores[q0:q0 + block.shape[0]] = best_scores.cpu().numpy()
        out_index[q0:q0 + block.shape[0]] = best_index.cpu().numpy()
    return out_scores, out_index
