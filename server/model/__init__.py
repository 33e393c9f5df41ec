"""The model: a Llama-family decoder written for the paged KV cache, its attention (torch and
Triton), rotary embeddings, and reading Hugging Face checkpoints."""
