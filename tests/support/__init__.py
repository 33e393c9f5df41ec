"""What the tests share besides fixtures (conftest.py): engines, servers, stand-ins, waiting.

What a user of lorafleet would import for their own tests (tiny checkpoints, random adapters) is
in ``lorafleet.testing``; this package is the suite's own.
"""
