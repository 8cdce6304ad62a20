"""specdec: the parts of the speculative decoding server that more than one service uses.

Sampling math and the acceptance rule (`sampling`), model loading (`models`), per-session
KV caches (`kv_cache`), the Redis session store (`session_store`), the tensor wire codec
(`tensor_codec`), errors and their gRPC status codes (`errors`), server plumbing (`serving`)
and the `specdec` command line (`cli`).
"""
