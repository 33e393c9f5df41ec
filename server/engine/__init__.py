"""The engine: requests as sequences, the paged KV cache, continuous batching, one step at a time,
sampling and detokenizing, and the thread that runs it for the HTTP layer."""
