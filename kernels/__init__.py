"""Fused ops of fastbond, each with `reference`, `chunked` and `triton` backends."""
