"""The kopf operator: BaseModel and Adapter resources become fleets and pre-warmed adapters.

Imported as ``lorafleet.operator`` (see pyproject's package-dir), never as ``operator``.
"""
