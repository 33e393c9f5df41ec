"""lorafleet's own admin routes (LoRAX has none): list, load (pre-warm, pin) and unload adapters."""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from lorafleet.adapter_ref import AdapterRef
from lorafleet.bearer import offered_one_of
from lorafleet.server.adapters.state import TIERS
from lorafleet.server.api.catalogue import MAX_CANARIES, MAX_CATALOGUE, MAX_NAME_LENGTH, MAX_OWNERS, Catalogue
from lorafleet.server.api.deps import Service
from lorafleet.server.api.http_common import error_response, read_json_object
from lorafleet.server.api.service import ReplicaService
from lorafleet.server.api.validation import parse_adapter
from lorafleet.server.errors import Forbidden, Overloaded, Unauthorized, ValidationError
from lorafleet.token_bucket import TokenBucket
from lorafleet.traffic_split import Split

CLOSED = ("admin routes are off on this replica: start it with --admin-token (LORAFLEET_ADMIN_TOKEN) and send that token, "
          "or with --admin-open on a machine nobody else can reach")


def require_admin(service: ReplicaService, request: Request) -> None:
    """Load, pin and unload change what every client gets: they take the admin token, not a client's key.
    Secure by default: with no token configured they are refused, unless the replica was started --admin-open."""
    config = service.config
    if config.admin_token is None:
        if not config.admin_open:
            raise Forbidden(CLOSED)
        return
    if not offered_one_of(request.headers.get("authorization"), [config.admin_token]):
        raise Unauthorized("this route needs the replica's admin token (Authorization: Bearer <admin token>)")


def require_warm(service: ReplicaService, request: Request) -> None:
    """A warm takes a slot like a request does, so it is the gateways' to ask (their warm token), or the operator's
    (the admin token): a pod that can reach the replica must not be able to thrash its slots."""
    config = service.config
    if config.admin_token is None and config.warm_token is None:
        if not config.admin_open:
            raise Forbidden(CLOSED.replace("--admin-token (LORAFLEET_ADMIN_TOKEN)", "--warm-token or --admin-token"))
        return
    if not offered_one_of(request.headers.get("authorization"), [config.warm_token, config.admin_token]):
        raise Unauthorized("this route needs the replica's warm token (Authorization: Bearer <warm token>)")


# Hand-offs warm an adapter once per scale event and owner: a few a second is plenty; more is a thrash attempt.
WARM_RATE_PER_S = 5.0
WARM_BURST = 20


router = APIRouter(prefix="/adapters")


@router.get("", summary="adapters this replica knows, with their tier (?tier=device&tier=loading to filter)")
async def list_adapters(service: Service, tier: list[str] | None = Query(None)) -> Any:
    unknown = sorted(set(tier or ()) - set(TIERS))
    if unknown:
        raise ValidationError(f"unknown tier {', '.join(unknown)}; tiers are {', '.join(TIERS)}")
    listing = await service.list_adapters()
    return [a for a in listing if a["tier"] in tier] if tier else listing


@router.get("/catalogue", summary="the registered adapters: name -> id, source, revision (the fleet's Adapter resources)")
async def get_catalogue(service: Service, request: Request) -> Any:
    catalogue = service.catalogue
    etag = f'"{catalogue.version}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"etag": etag})
    return Response(catalogue.body, media_type="application/json", headers={"etag": etag})


MAX_STATS_VERSIONS = 64


@router.get("/stats", summary="requests, errors and time-to-first-token buckets per adapter version (?version=id@rev, repeated)")
async def version_stats(service: Service, request: Request, version: list[str] = Query(default=[])) -> Any:
    """What the operator's canary analysis reads. Admin-only: per-version traffic of other tenants is not a caller's."""
    require_admin(service, request)
    if len(version) > MAX_STATS_VERSIONS:
        raise ValidationError(f"at most {MAX_STATS_VERSIONS} versions per read, got {len(version)}")
    return {"versions": service.metrics.versions.read(version)}


@router.put("/catalogue", summary="replace the registered adapters (the operator keeps it equal to the Adapter resources)")
async def put_catalogue(service: Service, request: Request) -> Any:
    require_admin(service, request)
    body = await read_json_object(request)
    entries = body.get("adapters")
    if not isinstance(entries, list) or len(entries) > MAX_CATALOGUE:
        raise ValidationError(f"`adapters` must be a list of at most {MAX_CATALOGUE} entries")
    catalogue: dict[str, AdapterRef] = {}
    splits: dict[str, Split] = {}
    owners: dict[str, int] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not 0 < len(entry["name"]) <= MAX_NAME_LENGTH:
            raise ValidationError(f"each entry needs a `name` (a string of 1 to {MAX_NAME_LENGTH} characters) and an `id`")
        ref = parse_adapter(entry.get("id"), entry.get("source", "hub"), service.limits, entry.get("revision") or None)
        if ref is None:
            raise ValidationError(f"entry {entry['name']!r} needs an `id`")
        catalogue[entry["name"]] = ref
        try:
            split = Split.from_entry(entry.get("canary"))
        except ValueError as exc:
            raise ValidationError(f"entry {entry['name']!r}: {exc}") from exc
        spread = entry.get("owners", 1)
        if not isinstance(spread, int) or isinstance(spread, bool) or not 1 <= spread <= MAX_OWNERS:
            raise ValidationError(f"entry {entry['name']!r}: `owners` must be an integer from 1 to {MAX_OWNERS}")
        if spread > 1:
            owners[entry["name"]] = spread
        if split is not None:
            splits[entry["name"]] = split
            if len(splits) > MAX_CANARIES:
                raise ValidationError(f"at most {MAX_CANARIES} entries may carry a `canary` (rollouts under way at once)")
    snapshot = Catalogue.of(catalogue, service.base_name, splits, owners)  # hashed and encoded once, here
    service.limits.catalogue = catalogue  # one assignment: a request sees the old or the new, never half
    service.catalogue = snapshot
    return {"version": snapshot.version, "adapters": len(catalogue)}


def warm_budget(request: Request) -> TokenBucket:
    """One bucket per app (a process may run several, as the tests do), made on the first warm."""
    state = request.app.state
    if getattr(state, "warm_budget", None) is None:
        state.warm_budget = TokenBucket(WARM_RATE_PER_S, WARM_BURST)
    return state.warm_budget


@router.post("/warm", summary="load an adapter onto the device, unpinned (the warm or admin token; rate-limited)")
async def warm(service: Service, request: Request) -> Any:
    """The gateway's hand-off: it moves an adapter's traffic to a replica only once this answered."""
    require_warm(service, request)
    wait = warm_budget(request).take()
    if wait > 0:
        return error_response(Overloaded(f"more than {WARM_RATE_PER_S:g} warms a second (burst {WARM_BURST}) asked of this replica; "
                                         f"retry in {wait:.1f}s"), headers={"retry-after": str(max(1, math.ceil(wait)))})
    body = await read_json_object(request)
    ref = parse_adapter(body.get("adapter_id"), body.get("adapter_source"), service.limits, body.get("revision"))
    if ref is None:
        raise ValidationError("`adapter_id` is required")
    return await service.load_adapter(ref, pin=False)


@router.post("", summary="load an adapter onto the device (pre-warm), optionally pinned")
async def load(service: Service, request: Request) -> Any:
    require_admin(service, request)
    body = await read_json_object(request)
    ref = parse_adapter(body.get("adapter_id"), body.get("adapter_source"), service.limits, body.get("revision"))
    if ref is None:
        raise ValidationError("`adapter_id` is required")
    pin = body.get("pin", False)
    if not isinstance(pin, bool):
        raise ValidationError("`pin` must be true or false")
    token = body.get("api_token")
    if token is not None and not isinstance(token, str):
        raise ValidationError("`api_token` must be a string")
    return await service.load_adapter(ref, pin, token)


@router.delete("/{adapter_id:path}", summary="unpin and unload an adapter (by id or key)")
async def unload(service: Service, adapter_id: str, request: Request) -> Any:
    require_admin(service, request)
    return {"unloaded": await service.unload_adapter(adapter_id)}
