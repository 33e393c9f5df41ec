"""The replica: a batched multi-LoRA engine behind TGI/LoRAX- and OpenAI-compatible HTTP APIs."""
