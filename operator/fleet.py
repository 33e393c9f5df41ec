"""One BaseModel's adapters placed on its replicas: driven by watch events, checked by a slow safety net.

A pass compares three things it holds in memory — the Adapters (kopf's index of their watch events), the ready replica
pods, and what each replica holds (operator/fleet_members.py) — and starts only the work that differs: loads on owners
that lack an adapter, unloads where a moved adapter was placed before, validation of new generations, and status writes
whose content changed. It looks only at the Adapters something happened to (operator/pass_scope.py), so its cost
follows the events, not the size of the fleet. Work runs as tasks that wake the fleet when they finish; a pass never
waits on a replica or on the API server, so one slow download or one hung replica delays nothing else. At rest a pass
finds nothing to do and writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from lorafleet.adapter_ref import AdapterRef
from lorafleet.backoff import Backoff
from lorafleet.operator import adapter_check
from lorafleet.operator.adapter_status import FINALIZER, AdapterRecord, next_status, observed, serving_from_status, unplaced
from lorafleet.operator.book import AdapterBook, Retry
from lorafleet.operator.canaries import Canaries
from lorafleet.operator.config import DEFAULT_MAX_LORA_RANK
from lorafleet.operator.fleet_catalogue import FleetCatalogue
from lorafleet.operator.fleet_io import FleetIO, PodView
from lorafleet.operator.fleet_members import RELIST, FleetMembers
from lorafleet.operator.fleet_status import placement
from lorafleet.operator.pass_scope import PassScope
from lorafleet.operator.wakeable import Wakeable
from lorafleet.timestamps import now_text

log = logging.getLogger(__name__)
SETTLE_S = 2.0  # a status is not written while its adapter's work is younger than this (one write, not Warming then Ready)
QUEUED_PATIENCE_S = 30.0  # ...nor while its load waits behind other loads for a replica's call slot, up to this long
RETRY = Backoff(4.0, 60.0)  # a load or a validation fetch that failed for a reason that may pass
UNLOAD_GRACE_S = 3.0
COALESCE_S = 0.1  # events arrive by the thousand: a burst of them becomes one pass


class Fleet(Wakeable):
    def __init__(self, namespace: str, name: str, io: FleetIO, residency_check_s: float, write_concurrency: int = 8) -> None:
        super().__init__()
        self.namespace, self.name, self.io = namespace, name, io
        self._writes = asyncio.Semaphore(write_concurrency)
        self._members = FleetMembers(residency_check_s)  # ready pods and what each holds (operator/fleet_members.py)
        self.residency = self._members.held  # pod -> {adapter key: the content digest it serves}, once its listing is read
        self._tasks: dict[tuple, asyncio.Task] = {}  # running work, by what it is about
        self._books: dict[str, AdapterBook] = {}  # Adapter uid → what the fleet remembers of it (operator/book.py)
        self._scope = PassScope()  # which Adapters the next pass must look at (operator/pass_scope.py)
        self._rolling: set[str] = set()  # Adapters whose rollout is under way: looked at every pass
        self._awaiting_catalogue: set[str] = set()  # Adapters whose old version leaves once every replica holds the catalogue
        self._counted, self._lingering = 0, 0  # Adapters at the last pass; gone ones whose book waits for its work to end
        self._catalogue = FleetCatalogue()  # what the replicas learn of the Adapters' names (operator/fleet_catalogue.py)
        self._headers: dict[str, str] | None = None
        self.demand_owners: dict[str, int] = {}  # Adapter name -> owners its demand wants (autoscale_loop.py), when above warmReplicas
        # Adapter name -> how many of its first owners hold every version its name routes to: the gateways spread a name
        # over no more owners than that, so an owner its demand just added gets traffic once it is warm, not before
        # (publishing the demand at once sent a request to an owner still loading it: a cold answer in CI).
        self.warm_prefix: dict[str, int] = {}
        self._canaries = Canaries()  # rollouts whose canary takes part of a name's traffic (operator/canaries.py)

    # -- the loop -------------------------------------------------------------------------------

    async def run(self, records: Callable[[], Iterable[AdapterRecord]], pods: Callable[[], Iterable[PodView]],
                  engine: Callable[[], dict[str, Any]], stopped: Any) -> None:
        """Pass after pass until ``stopped``: after every wake-up, and at the latest when a retry or check is due."""
        self._loop = asyncio.get_running_loop()
        try:
            while not stopped:
                self.wake.clear()
                try:
                    await self.reconcile(list(records()), list(pods()), engine())
                except Exception:  # a bug in one pass must not end placement for the fleet
                    log.exception("fleet %s/%s: pass failed", self.namespace, self.name)
                    await asyncio.sleep(1.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), max(COALESCE_S, self._next_due() - time.monotonic()))
                await asyncio.sleep(COALESCE_S)  # a burst of events (a thousand creates, a load per answer) becomes one pass
        finally:
            for task in list(self._tasks.values()):
                task.cancel()

    def _next_due(self) -> float:
        return min(self._scope.next_due(), *self._members.dues(), *self._catalogue.dues(), *self._canaries.dues())

    def _book(self, uid: str) -> AdapterBook:
        return self._books.setdefault(uid, AdapterBook())

    def _spawn(self, key: tuple, uid: str | None, work: Any, settles: bool = True) -> None:
        """Run ``work`` once at a time per ``key``; ``uid`` names the adapter the next pass looks at when it ends, and (with
        ``settles``) whose status waits for it to settle."""
        if key in self._tasks:
            work.close()
            return
        if uid is not None and settles:
            book = self._book(uid)
            book.work_since = book.work_since or time.monotonic()
            book.work_count += 1

        async def wrapped() -> None:
            try:
                await work
            except Exception:
                log.exception("fleet %s/%s: %s failed", self.namespace, self.name, key)
            finally:
                del self._tasks[key]
                if uid is not None:
                    self._scope.touch(uid)
                book = self._books.get(uid) if uid is not None and settles else None
                if book is not None:
                    book.work_count -= 1
                    if not book.work_count:
                        book.work_since = None
                self.wake.set()

        self._tasks[key] = asyncio.create_task(wrapped())

    # -- one pass -------------------------------------------------------------------------------

    async def reconcile(self, records: list[AdapterRecord], pods: list[PodView], engine: dict[str, Any]) -> None:
        """Look at the Adapters something happened to (operator/pass_scope.py), then share the catalogue if it changed."""
        now = time.monotonic()
        members = self._follow_pods(pods, now)
        known = sorted(members)  # placement uses every ready member, as the gateway's ring does
        self._scope.world((self._members.seen, engine, dict(self.demand_owners)))
        for record in self._scope.select(records, now, self._rolling | self._canaries.uids()):
            uid = record.uid
            if record.deleting:
                self._catalogue.name(uid, None)
                self._spawn(("delete", uid), uid, self._delete(record, members))
                continue
            if FINALIZER not in record.finalizers and not self._book(uid).finalized:
                self._spawn(("finalizer", uid), uid, self._add_finalizer(record))
            self._place(record, members, known, engine, now)
            book = self._book(uid)
            self._catalogue.name(uid, (record.name, self._serving(record)))
            self._scope.looked_at(uid, book.dues(SETTLE_S, QUEUED_PATIENCE_S), now)
            if book.rollout is not None:  # looked at every pass while it rolls
                self._rolling.add(uid)
            else:
                self._rolling.discard(uid)
        if self._scope.arrived or len(records) != self._counted or self._lingering:  # an Adapter may have gone
            self._counted = len(records)
            self._forget_gone(records)
        self._share_catalogue(records, members, now)
        self._read_counters(members, now)

    def _forget_gone(self, records: list[AdapterRecord]) -> None:
        """What the fleet remembers of Adapters that no longer exist (a book whose work still runs goes on a later pass)."""
        present = {r.uid for r in records}
        self._catalogue.keep(present)
        gone = [u for u in self._books if u not in present]
        self._lingering = 0
        for uid in gone:
            if self._books[uid].work_count:
                self._lingering += 1
                continue
            del self._books[uid]
            self._canaries.forget(uid)
            self._scope.forget(uid)
            self._rolling.discard(uid)
            self._awaiting_catalogue.discard(uid)

    def _serving(self, record: AdapterRecord) -> AdapterRef:
        """The version the Adapter's name goes to: the spec's once it is hot on every owner, until then the one before."""
        book = self._books.get(record.uid)
        return book.serving if book is not None and book.serving is not None else record.ref

    def _share_catalogue(self, records: list[AdapterRecord], members: dict[str, str], now: float) -> None:
        """Every replica learns the fleet's Adapters (name -> id, source, revision), so a name alone is a request."""
        spread = {name: max(1, min(wanted, self.warm_prefix.get(name, 1))) for name, wanted in self.demand_owners.items()}
        entries, version = self._catalogue.current(self._canaries.catalogue_canaries(records), spread, now)
        for pod, url, sent in self._catalogue.to_send(members, self._members.seen, version, now):
            self._spawn(("catalogue", pod), None, self._put_catalogue(pod, url, entries, sent))

    async def _put_catalogue(self, pod: str, url: str, entries: list[dict[str, Any]], sent: tuple) -> None:
        if await self.io.calls.put_catalogue(url, entries, await self._admin_headers()):
            self._catalogue.sent[pod] = sent
            self._catalogue.retry.pop(pod, None)
            for uid in self._awaiting_catalogue:
                self._scope.touch(uid)
        else:
            self._headers = None  # read the admin token again: it may not have existed, or was rotated
            self._catalogue.retry[pod] = time.monotonic() + RELIST.delay(1)

    def _read_counters(self, members: dict[str, str], now: float) -> None:
        """While a canary takes traffic, every replica's counters of the versions under analysis, each interval."""
        self._canaries.keep_pods(members)
        versions = self._canaries.versions(self._books)
        if versions and self._canaries.reading_due(now):
            for pod, url in members.items():
                self._spawn(("counters", pod), None, self._read_pod_counters(pod, url, versions))

    async def _read_pod_counters(self, pod: str, url: str, versions: list[str]) -> None:
        try:
            self._canaries.counts[pod] = await self.io.calls.version_stats(url, versions, await self._admin_headers())
        except Exception as exc:  # the analysis waits for the next read; a step cannot pass on counts it lacks
            log.info("fleet %s/%s: counters of %s failed: %s", self.namespace, self.name, pod, exc)

    def _follow_pods(self, pods: list[PodView], now: float) -> dict[str, str]:
        """Ready members; a new, restarted or returning pod has its listing read again."""
        members, to_read = self._members.follow(pods, now)
        for name, url in to_read:
            self._spawn(("list", name), None, self._read_listing(name, url))
        return members

    async def _read_listing(self, pod: str, url: str) -> None:
        try:
            listing = await self.io.calls.resident(url)
        except Exception as exc:  # keep what we knew; try again soon
            log.info("fleet %s/%s: listing %s failed: %s", self.namespace, self.name, pod, exc)
            self._members.listing_failed(pod, time.monotonic())
            return
        if self._members.listed(pod, url, listing):
            self._scope.everything()  # every Adapter placed there may be hot or missing now

    def _place(self, record: AdapterRecord, members: dict[str, str], known: list[str], engine: dict[str, Any], now: float) -> None:
        book = self._book(record.uid)
        checked = self._validation(record, engine, now)
        if checked is None:
            return
        if checked[0] == "failed":  # a broken new version: the one serving goes on serving
            self._publish(record, observed(record, [], [], [], None, [], failure=checked[1:], serving=book.serving))
            return
        _, rank, targets, commit = checked
        if commit:  # spec.revision is a branch or a tag: every replica loads the one commit it stood for when checked
            record = dataclasses.replace(record, revision=commit)
        if book.serving is None:  # first sight, or an operator restart in the middle of a rollout
            book.serving = serving_from_status(record.status) or record.ref
        if record.warm > 0 and book.refused is not None and book.refused[0] == record.generation:
            _, reason, message = book.refused
            self._publish(record, observed(record, [], [], [], rank, targets, failure=(reason, message), serving=book.serving))
            return
        if book.placed is None:
            book.placed = {(pod, record.ref.key) for pod in record.status.get("replicas") or []}
        placed = book.placed
        rollout = self._canaries.current(record, book, now)
        stable_only = rollout is not None and rollout.phase in ("RolledBack", "Aborted")  # the spec's version serves nowhere
        ref = book.serving if stable_only else record.ref  # the version the status reports on
        owners, hot, problems = self._warm(record, ref, members, known, now)
        wanted = {(pod, ref.key) for pod in owners}
        warm_prefix = leading_held(owners, hot)
        if rollout is not None and not stable_only and book.serving != record.ref:  # stable keeps serving its share meanwhile
            stable_owners, stable_hot, _ = self._warm(record, book.serving, members, known, now)
            wanted |= {(pod, book.serving.key) for pod in stable_owners}
            warm_prefix = min(warm_prefix, leading_held(stable_owners, stable_hot))
        self.warm_prefix[record.name] = warm_prefix
        all_hot = len(hot) == len(owners)
        if rollout is not None:
            if self._canaries.step(record, rollout, all_hot, now):
                self._spawn(("action", record.uid), record.uid, self._write(lambda: self.io.kube.merge(
                    "lorafleet.io/v1alpha1", "Adapter", record.namespace, record.name, record.action_done_patch())), settles=False)
            if rollout.phase == "Promoted":
                book.serving = record.ref
        elif all_hot:
            book.serving = record.ref  # hot on every owner: its name may go to it now (the catalogue follows this pass)
        leftovers = placed - wanted
        if all_hot and leftovers:
            # Unloaded where it was only after the gateways have read (probe: 1 s) that the new owner holds
            # it: until then they may still send its traffic to the old holder. A version the name no longer serves
            # (a rollout promoted, a revision moved) waits first for every replica to hold the catalogue that says so
            # (the gateways read it from them): unloaded before, it met its last requests and loaded again, cold.
            # the name's version as of this pass counts as a change already (reconcile records it again after _place)
            self._catalogue.name(record.uid, (record.name, self._serving(record)))
            renamed = any(held != ref.key for _, held in leftovers)
            if book.unload_at is None and renamed and not self._catalogue.delivered(members):
                self._awaiting_catalogue.add(record.uid)  # looked at again as each replica acknowledges a catalogue
            elif book.unload_at is None:
                self._awaiting_catalogue.discard(record.uid)
                book.unload_at = now + UNLOAD_GRACE_S
            if book.unload_at is not None and now >= book.unload_at:
                book.unload_at = None
                for pod, held in sorted(leftovers):
                    if pod in members:
                        self._spawn(("unload", pod, held, record.uid), record.uid, self._unload(record, pod, members[pod], held))
                    else:
                        placed.discard((pod, held))
        if any(("list", pod) in self._tasks for pod in owners):
            return  # an owner's listing is being read: publish what it shows, not a Warming in between
        digests = sorted({d for pod in hot if (d := self.residency.get(pod, {}).get(ref.key))})
        seen = observed(record, owners, hot, problems, rank, targets, digests, serving=book.serving, rollout=self._canaries.status(record, rollout))
        self._publish(record, {**seen, "resolvedRevision": commit})

    def _warm(self, record: AdapterRecord, ref: AdapterRef, members: dict[str, str], known: list[str], now: float) -> tuple[list[str], list[str], list[str]]:
        """(owners, the owners holding ``ref``, problems): loads ``ref`` on the owners the gateways route it to that lack it."""
        key = ref.key  # the version exactly: an older revision resident there is not this one
        owners = placement(ref.ring_key, known, max(record.warm, self.demand_owners.get(record.name, 0)))
        hot, problems = [], []
        for pod in owners:
            if key in self.residency.get(pod, {}):
                hot.append(pod)
                self._book(record.uid).placed.add((pod, key))
                continue
            retry = self._book(record.uid).load_retry.get((pod, key))
            if retry is not None:
                problems.append(f"{pod}: {retry.problem}")
            if pod in self.residency and (retry is None or retry.not_before <= now):
                self._spawn(("load", pod, record.uid, key), record.uid, self._load(record, ref, pod, members[pod]))
        return owners, hot, problems

    # -- validation -----------------------------------------------------------------------------

    def _validation(self, record: AdapterRecord, engine: dict[str, Any], now: float) -> tuple | None:
        """("ok", rank, targets) or ("failed", reason, message); None while it is being checked."""
        # the version and the engine's limit decide the check, not the generation (pausing a rollout fetches nothing)
        what = (record.id, record.source, record.revision, engine.get("maxLoraRank", DEFAULT_MAX_LORA_RANK))
        book = self._book(record.uid)
        done = book.checked
        if done is not None and done[0] == what:
            return done[1]
        status = record.status
        if status.get("observedGeneration") == record.generation and status.get("phase") == "Failed" and status.get("reason") in ("Invalid", "LoadFailed"):
            result: tuple = ("failed", status["reason"], status.get("message", ""))
            book.checked = (what, result)
            return result
        previous = record.already_validated(adapter_check.moving(record.source, record.revision))
        if previous is not None and done is None:  # an operator restart: the status says this generation passed
            book.checked = (what, ("ok", *previous))
            return book.checked[1]
        retry = book.check_retry
        if retry is not None:
            self._publish(record, unplaced(record, "Pending", "SourceUnavailable", retry.problem))
        if retry is None or retry.not_before <= now:
            self._spawn(("check", record.uid), record.uid, self._check(record, engine, what))
        return None

    async def _check(self, record: AdapterRecord, engine: dict[str, Any], what: tuple) -> None:
        try:
            result = await asyncio.get_running_loop().run_in_executor(self.io.executor, adapter_check.validate, record.source, record.id,
                                                                      record.revision, engine)
        except adapter_check.Permanent as exc:
            result = ("failed", "Invalid", str(exc))
        except adapter_check.Transient as exc:
            book = self._book(record.uid)
            book.check_retry = Retry.after(book.check_retry, str(exc), RETRY)
            return
        book = self._book(record.uid)
        book.check_retry, book.checked = None, (what, result)

    # -- replica work ---------------------------------------------------------------------------

    async def _admin_headers(self) -> dict[str, str]:
        """The fleet's admin token, read from its Secret once, and again after a replica refused it."""
        if self._headers is None:
            self._headers = await asyncio.get_running_loop().run_in_executor(self.io.executor, self.io.admin_headers)
        return self._headers

    async def _load(self, record: AdapterRecord, ref: AdapterRef, pod: str, url: str) -> None:
        book = self._book(record.uid)
        book.queued += 1
        waiting = True

        def started() -> None:  # the settle period counts from here: a load queued behind a thousand others is not slow itself
            nonlocal waiting
            waiting, book.queued = False, book.queued - 1
            book.work_since = max(book.work_since or 0.0, time.monotonic())

        try:
            result = await self.io.calls.load(url, ref.load_body(record.pinned), await self._admin_headers(), started)
        finally:
            if waiting:
                book.queued -= 1
        key = ref.key
        if result.ok:
            book.load_retry.pop((pod, key), None)
            self.residency.setdefault(pod, {})[key] = result.digest
            book.placed = (book.placed or set()) | {(pod, key)}
        elif result.permanent:
            book.refused = (record.generation, "LoadFailed", f"{pod} refused the adapter: {result.message}")
        else:
            if result.unauthorized:
                self._headers = None  # the token may have been rotated
            book.load_retry[(pod, key)] = Retry.after(book.load_retry.get((pod, key)), result.message, RETRY)

    async def _unload(self, record: AdapterRecord, pod: str, url: str, key: str) -> None:
        if await self.io.calls.unload(url, key, await self._admin_headers()):
            self.residency.get(pod, {}).pop(key, None)
            placed = self._book(record.uid).placed
            if placed is not None:
                placed.discard((pod, key))

    async def _delete(self, record: AdapterRecord, members: dict[str, str]) -> None:
        """Unload it wherever it was placed, then let the object go."""
        key = record.ref.key
        holders = (self._book(record.uid).placed or set()) | {(p, key) for p in record.status.get("replicas") or []} | {
            (p, key) for p, held in self.residency.items() if key in held and record.pinned}
        for pod, held in sorted(holders):
            if pod in members:
                await self._unload(record, pod, members[pod], held)
        if FINALIZER in record.finalizers:
            await self._write(lambda: self.io.kube.merge("lorafleet.io/v1alpha1", "Adapter", record.namespace, record.name,
                                                         record.finalizer_patch(False)))

    async def _add_finalizer(self, record: AdapterRecord) -> None:
        if await self._write(lambda: self.io.kube.merge("lorafleet.io/v1alpha1", "Adapter", record.namespace, record.name,
                                                        record.finalizer_patch(True))):
            self._book(record.uid).finalized = True  # until its watch event shows it

    # -- status ---------------------------------------------------------------------------------

    def _publish(self, record: AdapterRecord, seen: dict[str, Any]) -> None:
        """Write the status when its content changed and the adapter's work has settled (or is slow)."""
        book = self._book(record.uid)
        if book.work_since is not None and seen["phase"] != "Failed":
            settling = time.monotonic() - book.work_since
            if settling < SETTLE_S or (book.queued and settling < QUEUED_PATIENCE_S):
                return
        previous = book.written if book.written is not None else record.status
        status = next_status(previous, seen, now_text())
        if status is None or ("status", record.uid) in self._tasks:
            return
        self._spawn(("status", record.uid), record.uid, self._write_status(record, previous, status), settles=False)

    async def _write_status(self, record: AdapterRecord, previous: dict[str, Any], status: dict[str, Any]) -> None:
        ok = await self._write(lambda: self.io.kube.merge_status("lorafleet.io/v1alpha1", "Adapter", record.namespace, record.name, status))
        if not ok:
            return
        self._book(record.uid).written = {k: v for k, v in status.items() if v is not None}
        if status["phase"] != previous.get("phase"):
            kind = "Warning" if status["phase"] in ("Failed", "RolledBack") else "Normal"
            self.io.event(record.reference, kind, status.get("reason") or status["phase"], status["message"])

    async def _write(self, call: Callable[[], Any]) -> bool:
        async with self._writes:
            try:
                await asyncio.get_running_loop().run_in_executor(self.io.executor, call)
            except Exception as exc:  # the object may be gone; the next pass decides again
                log.info("fleet %s/%s: write failed: %s", self.namespace, self.name, exc)
                return False
        return True


def leading_held(owners: list[str], hot: list[str]) -> int:
    """How many of ``owners``, in ring order, hold the adapter before the first that does not."""
    held = set(hot)
    return next((i for i, pod in enumerate(owners) if pod not in held), len(owners))

