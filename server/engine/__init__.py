"""The engine, split by job as nano-vllm's and vLLM's: ``engine.py`` steps (schedule → run → process output),
``scheduler.py`` chooses what runs, ``runner.py`` runs the model (dtype, kernels, KV and slot sizing, batch tensors,
CUDA graphs), ``output.py`` turns logits into tokens and finished requests, ``blocks.py`` owns the KV blocks and the
prefix cache. ``async_engine.py`` runs it on one thread and is the only door to engine and adapter state: other
threads send it commands (awaitable) and get answers back on their own loop. Imports model, lora and adapters;
nothing below imports it (tests/core/test_layers.py)."""
