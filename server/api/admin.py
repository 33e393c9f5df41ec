"""lorafleet's own admin routes (LoRAX has none): list, load (pre-warm, pin) and unload adapters."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from lorafleet.server.adapters.manager import TIERS
from lorafleet.server.api.http_common import bearer_token, error_response, read_json_object
from lorafleet.server.api.service import ReplicaService
from lorafleet.server.api.validation import parse_adapter
from lorafleet.server.errors import Unauthorized, ValidationError


def require_admin(service: ReplicaService, request: Request) -> None:
    """Load, pin and unload change what every client gets: they take the admin token, not a client's key."""
    expected = service.config.admin_token
    if expected is None:
        return
    offered = bearer_token(request) or ""
    if not hmac.compare_digest(offered.encode("utf-8", "surrogateescape"), expected.encode()):
        raise Unauthorized("this route needs the replica's admin token (Authorization: Bearer <admin token>)")


def admin_router(service: ReplicaService) -> APIRouter:
    router = APIRouter(prefix="/adapters")

    @router.get("", summary="adapters this replica knows, with their tier (?tier=device&tier=loading to filter)")
    async def list_adapters(tier: list[str] | None = Query(None)) -> Any:
        unknown = sorted(set(tier or ()) - set(TIERS))
        if unknown:
            return error_response(ValidationError(f"unknown tier {', '.join(unknown)}; tiers are {', '.join(TIERS)}"))
        listing = service.engine.adapters.describe(service.in_flight_by_adapter())
        return [a for a in listing if a["tier"] in tier] if tier else listing

    @router.post("", summary="load an adapter onto the device (pre-warm), optionally pinned")
    async def load(request: Request) -> Any:
        try:
            require_admin(service, request)
            body = await read_json_object(request)
            ref = parse_adapter(body.get("adapter_id"), body.get("adapter_source"), service.limits)
            if ref is None:
                raise ValidationError("`adapter_id` is required")
            pin = body.get("pin", False)
            if not isinstance(pin, bool):
                raise ValidationError("`pin` must be true or false")
            token = body.get("api_token")
            if token is not None and not isinstance(token, str):
                raise ValidationError("`api_token` must be a string")
            return await service.load_adapter(ref, pin, token)
        except TimeoutError as exc:
            return JSONResponse({"error": str(exc), "error_type": "overloaded"}, status_code=503)
        except Exception as exc:
            return error_response(exc)

    @router.delete("/{adapter_id:path}", summary="unpin and unload an adapter (by id or key)")
    async def unload(adapter_id: str, request: Request) -> Any:
        try:
            require_admin(service, request)
        except Unauthorized as exc:
            return error_response(exc)
        manager = service.engine.adapters
        keys = [k for k, s in list(manager.states.items()) if adapter_id in (k, s.ref.id)]
        if not keys:
            return JSONResponse({"error": f"adapter {adapter_id!r} is not loaded", "error_type": "not_found"}, status_code=404)
        for key in keys:
            manager.unpin(key)

            def drop(key: str = key) -> bool:
                running = {s.adapter for s in service.engine.scheduler.running if s.adapter}
                return manager.unload(key, running)

            if not await service.runner.call(drop):
                return JSONResponse({"error": f"adapter {adapter_id!r} is serving requests; unpinned, it will be evicted when idle",
                                     "error_type": "overloaded"}, status_code=409)
        return {"unloaded": keys}

    return router
