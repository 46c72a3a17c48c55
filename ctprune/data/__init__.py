"""Parallel corpora, the tokenizer, and batching."""
