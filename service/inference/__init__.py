"""The engine and the model: queueing, batched decoding, loading at a precision. Knows nothing of HTTP.

Importing this package (or `engine`, `text`, `memory`) stays cheap: only `backend`, `loading`,
`quantized` and `attention` import torch and Transformers, and the engine loads them in its own thread.
"""
