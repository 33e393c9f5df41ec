"""Multi-LoRA: the PEFT adapter format, device slots that stack resident adapters, and the batched
kernels that apply a different adapter to each row of one forward pass (torch and Triton)."""
