"""The model: a Llama-family decoder written for the paged KV cache, the cache's tensors (``kv.py``), its attention
(torch and Triton), rotary embeddings, and reading Hugging Face checkpoints. Imports nothing from the engine."""
