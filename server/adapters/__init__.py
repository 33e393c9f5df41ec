"""Where adapters come from and which tier holds them: sources (hub, local, S3), the disk and CPU caches, and the
manager that moves them into device slots without stalling the engine. The manager is driven from the engine thread
(server/engine/async_engine.py: requests, slots, pins, unloads, listings); loader threads fetch and parse, write
their outcome to the adapter's state under the manager's lock, and wake the engine thread (``on_settled``); failures
reach waiting requests through a list the engine thread drains. An adapter's identity is
``lorafleet.adapter_ref.AdapterRef``."""
