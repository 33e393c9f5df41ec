"""lorafleet: one base model per replica, thousands of LoRA adapters hot-swapped per request."""

__version__ = "0.1.0"
