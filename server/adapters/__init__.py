"""Where adapters come from and which tier holds them: sources (hub, local, S3), the disk and CPU caches, and the
manager that moves them into device slots without stalling the engine. The manager's state belongs to the engine
thread (server/engine/async_engine.py: requests, slots, pins, unloads, listings): loader threads fetch and parse, then
hand each outcome back on a queue (``AdapterManager.settle`` applies it on the engine thread, which they wake with
``on_settled``). An adapter's identity is ``lorafleet.adapter_ref.AdapterRef``."""
