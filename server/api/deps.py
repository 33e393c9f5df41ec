"""The replica's routers are module-level (FastAPI's idiom); a route reaches the service through this dependency,
which reads what ``create_app`` put in ``app.state``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from lorafleet.server.api.service import ReplicaService


def replica_service(request: Request) -> ReplicaService:
    return request.app.state.service


Service = Annotated[ReplicaService, Depends(replica_service)]
