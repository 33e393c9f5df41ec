"""An Adapter as the operator keeps it in memory, and its status from what the replicas report. Pure functions.

The status is written only when something a reader would notice changes: at rest a thousand
Adapters cost the API server nothing. Following the Kubernetes API conventions, a condition's
``lastTransitionTime`` moves only when its ``status`` flips, never because a message was reworded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorafleet.adapter_ref import AdapterRef
from lorafleet.operator.rollout import ACTION_ANNOTATION

# Unload from the replicas before an Adapter goes. Not kopf's own finalizer name: kopf removes its
# finalizer from objects none of its handlers needs it on (that also frees Adapters made by versions
# that used kopf's per-object handlers).
FINALIZER = "lorafleet.io/unload"
RESIDENT_TIERS = ("device", "cpu")  # tiers a replica's GET /adapters reports that serve without a fetch


@dataclass(frozen=True)
class AdapterRecord:
    """The fields of an Adapter the fleet controller reads, taken from a watch event (kopf's index)."""

    name: str
    namespace: str
    uid: str
    generation: int
    base: str
    id: str
    source: str
    revision: str | None
    warm: int
    pinned: bool
    status: dict[str, Any] = field(default_factory=dict, compare=False)
    finalizers: tuple[str, ...] = ()
    deleting: bool = False
    rollout: dict[str, Any] = field(default_factory=dict, compare=False)  # spec.rollout (operator/rollout.py)
    action: str | None = None  # the lorafleet.io/rollout-action annotation: promote or abort the rollout under way

    @classmethod
    def from_body(cls, body: Any) -> AdapterRecord:
        meta, spec = body["metadata"], body.get("spec") or {}
        return cls(
            name=meta["name"], namespace=meta.get("namespace") or "default", uid=meta.get("uid", ""), generation=meta.get("generation", 1),
            base=spec.get("baseModel", ""), id=spec.get("id", ""), source=spec.get("source", "hub"), revision=spec.get("revision"),
            warm=spec.get("warmReplicas", 1), pinned=bool(spec.get("pinned")), status=dict(body.get("status") or {}),
            finalizers=tuple(meta.get("finalizers") or ()), deleting=bool(meta.get("deletionTimestamp")),
            rollout=dict(spec.get("rollout") or {}), action=(meta.get("annotations") or {}).get(ACTION_ANNOTATION),
        )

    @property
    def reference(self) -> dict[str, Any]:
        """Enough of the object for kopf to post an Event about it."""
        return {"apiVersion": "lorafleet.io/v1alpha1", "kind": "Adapter", "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid}}

    @property
    def ref(self) -> AdapterRef:
        """The version this Adapter names: its ``key`` is what replicas list, its ``ring_key`` what gateways route by."""
        return AdapterRef(self.source, self.id, self.revision)

    def load_request(self) -> dict[str, Any]:
        return self.ref.load_body(self.pinned)

    def action_done_patch(self) -> dict[str, Any]:
        """The merge patch that removes the rollout action annotation once it was acted on."""
        return {"metadata": {"annotations": {ACTION_ANNOTATION: None}}}

    def finalizer_patch(self, present: bool) -> dict[str, Any]:
        """The merge patch that adds (``present``) or removes lorafleet's finalizer, keeping everyone else's."""
        others = [f for f in self.finalizers if f != FINALIZER]
        return {"metadata": {"finalizers": [*others, FINALIZER] if present else others}}

    def already_validated(self, moving: bool) -> tuple[int | None, list[str], str | None] | None:
        """(rank, targets, resolved commit) when the status says this generation passed validation (an operator restart
        need not fetch again); ``moving``: the revision is a branch or tag, so the status must also say its commit."""
        status = self.status
        if status.get("observedGeneration") == self.generation and status.get("phase") in ("Ready", "Warming", "Degraded", "Rolling", "Canary", "RolledBack"):
            resolved = status.get("resolvedRevision")
            if moving and not isinstance(resolved, str):
                return None
            return status.get("rank"), list(status.get("targetModules") or []), resolved if moving else None
        return None


def unplaced(record: AdapterRecord, phase: str, reason: str, message: str) -> dict[str, Any]:
    """What the fleet shows of an adapter that is on no replica: Failed, or Pending while its source is down."""
    return {"phase": phase, "reason": reason, "message": message, "observedGeneration": record.generation, "replicas": [], "hotOn": ""}


def observed(record: AdapterRecord, owners: list[str], hot: list[str], problems: list[str], rank: int | None, targets: list[str],
             digests: list[str] | None = None, failure: tuple[str, str] | None = None, serving: AdapterRef | None = None,
             rollout: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the fleet shows of an adapter: ``hot`` are the owners whose own listing holds it resident; ``digests`` the
    content digests they serve it with (one, unless replicas read different files under one version); ``serving``
    the version its name is sent to while the spec's is not yet hot everywhere (an update rolling out); ``rollout``
    a canary's state (``Rollout.status``): its phase becomes the Adapter's while it takes traffic or was rolled back."""
    rolling = serving is not None and serving != record.ref
    if failure is not None:
        reason, message = failure
        status = unplaced(record, "Failed", reason, message + (f"; {serving.ring_key} still serves" if rolling else ""))
        return {**status, "serving": serving.entry(record.name)} if rolling else status
    if record.warm == 0 and not owners:
        phase, reason, message = "Ready", "Lazy", "lazy: loaded on first request"
    elif not owners:
        phase, reason, message = "Warming", "NoReplicaReady", "no replica is ready yet"
    elif len(hot) == len(owners):
        phase, reason, message = "Ready", "Resident", f"hot on {', '.join(hot)}"
    else:
        waiting = "; ".join(problems) or f"loading on {', '.join(p for p in owners if p not in hot)}"
        phase, reason, message = ("Degraded", "PartlyResident", waiting) if hot else ("Warming", "Loading", waiting)
    if rolling:
        phase, reason = "Rolling", "Rolling"
        message = f"warming {record.ref.ring_key} ({len(hot)}/{len(owners)} owners hot); {serving.ring_key} serves until then"
    if rollout is not None and rollout["phase"] in ("Progressing", "Paused"):
        phase, reason = "Canary", rollout["reason"]
        message = f"{rollout['canary']} takes {rollout['weight']:g}% ({rollout['message']}); {rollout['stable']} the rest"
    elif rollout is not None and rollout["phase"] in ("RolledBack", "Aborted"):
        phase, reason, message = "RolledBack", rollout["reason"], rollout["message"]
    return {"phase": phase, "reason": reason, "message": message, "observedGeneration": record.generation, "replicas": list(hot),
            "hotOn": ",".join(hot), "rank": rank, "targetModules": list(targets), "digest": ",".join(digests or []) or None,
            "serving": (serving or record.ref).entry(record.name), "rollout": rollout, "owners": len(owners)}


def serving_from_status(status: dict[str, Any]) -> AdapterRef | None:
    """The served version as status wrote it (its catalogue entry), read back after an operator restart so a rollout
    under way goes on; None when there is none that names a version."""
    entry = status.get("serving")
    try:
        return AdapterRef.from_entry(entry) if isinstance(entry, dict) else None
    except ValueError:
        return None


def next_status(previous: dict[str, Any], now_observed: dict[str, Any], now: str) -> dict[str, Any] | None:
    """The status to write, or None when it would change nothing but timestamps."""
    ready = now_observed["phase"] == "Ready"
    old = next((c for c in previous.get("conditions") or [] if c.get("type") == "Ready"), None)
    flipped = old is None or old.get("status") != ("True" if ready else "False")
    condition = {"type": "Ready", "status": "True" if ready else "False", "reason": now_observed["reason"], "message": now_observed["message"],
                 "observedGeneration": now_observed["observedGeneration"],
                 "lastTransitionTime": now if flipped else old.get("lastTransitionTime", now)}
    status = {**now_observed, "conditions": [condition]}
    current = {k: previous.get(k) for k in status}
    if current == status and all(previous.get(k) is None for k in previous if k not in status):
        return None
    # Fields this version no longer writes are removed (a merge patch deletes a key set to null).
    return {**{k: None for k in previous if k not in status}, **status}
