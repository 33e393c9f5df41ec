"""Where adapters come from and which tier holds them: sources (hub, local, S3), the disk and CPU
caches, and the manager that moves them into device slots without stalling the engine."""
