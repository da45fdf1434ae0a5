"""Qwen3-VL-Embedding and Qwen3-VL-Reranker, natively on transformers' Qwen3-VL modules."""
