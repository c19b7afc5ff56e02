"""The factory: starts LMs, notices their ends, enforces limits, and survives its own restarts.

One thread owns the store and makes every decision; backends only push "this LM may have ended"
notifications (uuids) into a queue. :meth:`Factory.run` waits on that queue until the next
deadline (an LM's shutdowntime, a stop's grace period, a heartbeat check, the periodic
reconcile), so an exit is handled, accounted and its processors reused within a second, without
Vac's fixed 60 s cycle.

This module orchestrates; each job has its own module: the plan (:mod:`lmrunner.slots`), a
start's record and spec (:mod:`lmrunner.spec`), the LM's cgroup (:mod:`lmrunner.lmcgroups`) and
filesystem (:mod:`lmrunner.lmdisks`), its end and accounting (:mod:`lmrunner.ending`), engine
objects nobody holds and old folders (:mod:`lmrunner.reconcile`), the rules
(:mod:`lmrunner.lifecycle`), fault containment (:mod:`lmrunner.guard`) and the state directory's
health (:mod:`lmrunner.statedir`).
"""

from __future__ import annotations

import logging
import os
import queue
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from lmrunner import lmdisks, payload, planning, slots, spec, statedir
from lmrunner import reload as reloading
from lmrunner.backends.base import Backend, EngineState
from lmrunner.cgroups import CgroupController
from lmrunner.config import Config
from lmrunner.diskmethods import DiskMethod
from lmrunner.ending import RESTART_OUTCOME, UNRECORDED_OUTCOME, Endings, lm_fields
from lmrunner.enforce import Enforcer
from lmrunner.errors import BackendError, BackendUnavailable, LmrunnerError, MachineNotFound
from lmrunner.guard import guarded
from lmrunner.images import DownloadSettings, ImageCache, ImageState, is_remote
from lmrunner.lifecycle import (
    LmState,
    operator_outcome,
    start_failed_outcome,
)
from lmrunner.lmcgroups import LmCgroups
from lmrunner.observe import Observer
from lmrunner.reconcile import Reaper, cleanup_directories, engine_objects, remove_all
from lmrunner.state import LmRecord, Store, StoreError, StoreUnwritable
from lmrunner.vacquery.space import SpaceView

LOG = logging.getLogger(__name__)
CLEANUP_SECONDS = 3600.0  # LM directories live for days: an hourly look is enough


@dataclass(frozen=True, slots=True)
class Tuning:
    """How eagerly the factory works (defaults suit production; tests shorten them)."""

    max_starts_per_pass: int = 8  # several LMs per pass, not Vac's one per minute
    reconcile_seconds: float = 30.0  # catch anything a backend failed to report
    orphan_grace_seconds: float = 300.0  # labelled engine objects without a record
    idle_wait_seconds: float = 5.0  # re-plan at least this often when processors are free
    min_free_bytes: int = statedir.MIN_FREE_BYTES  # in the state directory, to start LMs


@dataclass
class PassReport:
    """What one pass did (for logs, ``--once`` and tests)."""

    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    stopping: list[str] = field(default_factory=list)
    blocked: str | None = None


class Flag:
    """A request flag a signal handler may set at any moment. Not a threading.Event: its
    set() takes the lock its clear() holds, so a SIGHUP landing inside the loop's clear()
    deadlocked the daemon (seen in CI's SIGHUP storm). A plain attribute is atomic under the
    GIL, and clearing before acting loses no request: one set after the clear acts again."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set


class Factory:
    """Runs LMs for one configuration on one host."""

    def __init__(
        self,
        config: Config,
        store: Store,
        backends: Mapping[str, Backend],
        *,
        tuning: Tuning = Tuning(),
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        load_average: Callable[[], tuple[float, float, float]] = os.getloadavg,
        cgroups: CgroupController | None = None,
        images: ImageCache | None = None,
        disks: DiskMethod | None = None,
        space: Callable[[], SpaceView | None] | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.config = config
        self.images = images or self._image_cache(config, clock)
        self._image_told: dict[str, str] = {}  # machinetype -> the image state last logged
        self.store = store
        self.backends = backends
        self.cgroups = cgroups
        self.lm_cgroups = LmCgroups(cgroups, store)
        self.lm_disks = lmdisks.LmDisks(disks, store)
        #: The latest view of the other factories of the space (None: this one plans alone).
        self.space = space or (lambda: None)
        #: Told of starts, ends, passes and reactions (VacMon, metrics): takes note only.
        self.observer = observer or Observer()
        self.endings = Endings(store, self.lm_cgroups, self.lm_disks, clock, self.observer.ended)
        self.reaper = Reaper(store, clock, tuning.orphan_grace_seconds)
        self.enforcer = Enforcer(store, clock, clock())
        self.tuning = tuning
        self.clock = clock
        self.rng = rng or random.Random()
        self.load_average = load_average
        # SimpleQueue: its put is reentrant, so the SIGHUP/SIGTERM handlers (request_reload,
        # request_stop) can wake the loop even when the signal lands inside a get() or put()
        # of the main thread; queue.Queue's lock would deadlock the daemon there.
        self.events: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.stopping_requested = Flag()
        self.reload_requested = Flag()
        self.state_dir = statedir.Watch(store, tuning.min_free_bytes, clock)
        self.started_at = clock()
        self.unavailable: dict[str, str] = {}  # backend -> why (its machinetypes do not start)
        self.disk_refused: str | None = None  # why the last start was refused for its disk
        self._next_reconcile = 0.0
        self._event_times: dict[str, float] = {}  # uuid -> when its engine's event came
        self._next_cleanup = 0.0
        self._deadline = 0.0

    # --- start-up and adoption -------------------------------------------------------------

    def adopt(self) -> PassReport:
        """After a (re)start: reattach to every running LM and settle the half-done ones."""
        report = PassReport()
        for each in self.backends.values():
            each.watch(self.event)
        for record in self.store.active():
            with guarded(record.name):
                self._adopt(record, report)
        self.endings.backfill(self.config)
        return report

    def _adopt(self, record: LmRecord, report: PassReport) -> None:
        backend = self.backends.get(record.backend)
        if backend is None:
            LOG.error("lm=%s backend=%s: backend not available; left alone", record.name,
                      record.backend)  # fmt: skip
            return
        if record.handle is None:  # its start was interrupted
            self.endings.settle_half_created(self.config, record, backend, RESTART_OUTCOME)
            report.finished.append(record.name)
            return
        try:
            backend.recover(record.uuid, record.handle)
        except MachineNotFound:
            LOG.warning("lm=%s: gone from %s while lmrunner was down", record.name, record.backend)
        except BackendError as err:
            LOG.error("lm=%s: cannot reattach now: %s", record.name, err)
        self.events.put(record.uuid)  # inspect it in the next pass: it may have ended meanwhile
        LOG.info("lm=%s machinetype=%s: adopted", record.name, record.machinetype,
                 extra=lm_fields(record))  # fmt: skip

    # --- one pass ---------------------------------------------------------------------------

    def run_pass(self) -> PassReport:
        """Handle everything that is due now; return what was done."""
        report = PassReport()
        now = self.clock()
        self._deadline = now + self.tuning.idle_wait_seconds  # if this pass ends early
        self.state_dir.check(self.config.factory.state_dir)
        for uuid, action, grace in self.store.take_requests():
            self._request(report, uuid, action, grace)
        self._handle_events(report)
        if now >= self._next_reconcile:
            self._next_reconcile = now + self.tuning.reconcile_seconds
            self._reconcile(report)
        # One read of the active LMs serves enforcement, planning and the next wait: this pass
        # runs after every exit, and the table can hold thousands of LMs.
        active = []
        for record in self.store.active():
            with guarded(record.name):
                try:
                    record, stopping = self.enforcer.enforce(
                        self.config, self.backends, record, now
                    )
                except BackendError as err:  # it could not kill: its engine is in trouble
                    self._unavailable(self.backends[record.backend], err)
                else:
                    if stopping:
                        report.stopping.append(record.name)
            active.append(record)
        if self.store_problem is not None:
            report.blocked = self.store_problem
        elif not self.stopping_requested.is_set():
            active += self._start_lms(report, active)
        self._deadline = self._next_deadline(active, now)
        return report

    @property
    def store_problem(self) -> str | None:
        """Why the state directory cannot take more now (full, read-only); None when it can."""
        return self.state_dir.problem

    def _request(self, report: PassReport, uuid: str, action: str, grace: float | None) -> None:
        record = self.store.get(uuid)
        if record is None or not record.active or record.handle is None:
            return
        backend = self.backends.get(record.backend)
        force = action == "kill"
        if backend is not None:
            with guarded(record.name):
                self.enforcer.stop(self.config, backend, record, operator_outcome(force),
                                   grace=0 if force else grace)  # fmt: skip
                report.stopping.append(record.name)

    def event(self, uuid: str) -> None:
        """An engine says this LM may have ended (its watcher's thread): wake the loop. When
        it came is kept for the reaction time (a dict item set is atomic under the GIL)."""
        self._event_times.setdefault(uuid, time.monotonic())
        self.events.put(uuid)

    def _handle_events(self, report: PassReport) -> None:
        seen: set[str] = set()
        while True:
            try:
                uuid = self.events.get_nowait()
            except queue.Empty:
                return
            if uuid in seen:
                continue
            seen.add(uuid)
            record = self.store.get(uuid)
            if record is not None and record.active and record.handle is not None:
                with guarded(record.name):
                    self._check(record, report)
            came = self._event_times.pop(uuid, None)
            if came is not None:
                self.observer.reacted(time.monotonic() - came)

    def _check(self, record: LmRecord, report: PassReport) -> None:
        """Ask the engine about an LM; record its end when it has ended."""
        backend = self.backends.get(record.backend)
        if backend is None or record.handle is None:
            return
        try:
            status = backend.inspect(record.uuid, record.handle)
        except BackendUnavailable as err:
            self._unavailable(backend, err)
            return
        # Any other BackendError is this LM's alone (a corrupt record): logged by the guard.
        if status.state is not EngineState.RUNNING:
            self.endings.finish(self.config, record, backend, status)
            report.finished.append(record.name)

    def _reconcile(self, report: PassReport) -> None:
        """Inspect every active LM, settle unrecorded starts, remove leftover cgroups and
        engine objects nobody holds, and (hourly) old LM directories."""
        active = self.store.active()
        for record in active:
            backend = self.backends.get(record.backend)
            with guarded(record.name):
                if record.handle is not None:
                    self._check(record, report)
                elif backend is not None:
                    # Half-created outside any start (one thread starts LMs): its start could
                    # not be recorded, and what exists of it must not run unsupervised.
                    self.endings.settle_half_created(self.config, record, backend,
                                                     UNRECORDED_OUTCOME)  # fmt: skip
                    report.finished.append(record.name)
        active = self.store.active()  # afresh: some ended above
        self.lm_cgroups.sample_memory(active)
        self.lm_cgroups.remove_leftovers()
        self.lm_disks.sample(active)
        self.lm_disks.remove_leftovers()
        self.endings.publish(self.config)
        owned = engine_objects(self.backends, self._unavailable, self.unavailable)
        self.reaper.reap(owned, {record.uuid for record in active})
        now = self.clock()
        if now >= self._next_cleanup:
            self.cleanup_directories()
            self.images.prune(self._remote_images())
            self._next_cleanup = now + CLEANUP_SECONDS

    def cleanup_directories(self) -> list[Path]:
        """Remove LM directories older than their machinetype's ``machines_dir_days``."""
        return cleanup_directories(self.config, self.store, self.clock())

    def _unavailable(self, backend: Backend, why: object) -> None:
        """Start no LM of this backend until a reconcile finds it working; keep the others."""
        if backend.name not in self.unavailable:
            LOG.error("backend=%s: unavailable, its machinetypes wait: %s", backend.name, why)
        self.unavailable[backend.name] = str(why)

    # --- starting ----------------------------------------------------------------------------

    def plan(
        self, active: list[LmRecord], max_starts: int, *, working_engines_only: bool = True
    ) -> list[slots.StartDecision] | slots.Blocked:
        """What the planner would start now (:mod:`lmrunner.planning`); on every engine, working
        or not, for ``daemon --dry-run``."""
        engines = set(self.backends) - set(self.unavailable) if working_engines_only else None
        waiting = self._images_waiting() if working_engines_only else set()
        config, running, histories = planning.inputs(
            self.config, self.store, active, engines, waiting, self.space()
        )
        return slots.plan(
            config,
            running,
            histories,
            now=self.clock(),
            load_average=self.load_average(),
            counted_cpus=os.cpu_count() or 1,
            rng=self.rng,
            max_starts=max_starts,
        )

    def _start_lms(self, report: PassReport, active: list[LmRecord]) -> list[LmRecord]:
        """Start what the planner decides; returns the new records."""
        decisions = self.plan(active, self.tuning.max_starts_per_pass)
        if isinstance(decisions, slots.Blocked):
            report.blocked = decisions.reason
            return []
        used = {record.slot for record in active}
        free = (slot for slot in range(self.config.factory.total_processors) if slot not in used)
        started: list[LmRecord] = []
        for decision, slot in zip(decisions, free, strict=False):
            if self.stopping_requested.is_set():  # SIGTERM arrived during this pass
                break
            refused = self._disk_refusal(decision, active + started)
            if refused is not None:
                report.blocked = refused
                break
            record = None
            with guarded(f"slot {slot}"):
                record = self._start(decision, slot)
            if record is not None:
                report.started.append(record.name)
                started.append(record)
                self.observer.started(record)
        return started

    def _disk_refusal(self, decision: slots.StartDecision, active: list[LmRecord]) -> str | None:
        """Why the state directory cannot hold this LM's disk beside the others' (told once
        per episode), None when it can."""
        mt = self.config.machinetypes[decision.machinetype]
        size = payload.limits_for(self.config, mt, decision.processors).disk_bytes
        backend = self.backends.get(mt.backend.value)
        if size > 0 and backend is not None:
            size += backend.disk_overhead(size)
        refused = lmdisks.refusal(self.lm_disks.method, self.config.factory, active, size)
        if refused is not None and self.disk_refused is None:
            LOG.error("machinetype=%s: no LM starts: %s", mt.name, refused)
        elif refused is None and self.disk_refused is not None:
            LOG.warning("disk: the state directory can hold the LMs' disks again")
        self.disk_refused = refused
        return refused

    # --- remote images -------------------------------------------------------------------

    def _image_cache(self, config: Config, clock: Callable[[], float]) -> ImageCache:
        # A finished download wakes the loop (an empty event, as a signal's): its LMs start now.
        return ImageCache(config.factory.state_dir / "images", DownloadSettings.of(config.factory),
                          clock=clock, on_done=lambda: self.events.put(""))  # fmt: skip

    def _remote_images(self) -> set[str]:
        return {mt.image for mt in self.config.machinetypes.values() if is_remote(mt.image)}

    def image_state(self, name: str) -> ImageState | None:
        """The download state of machinetype ``name``'s image (None: not a remote image). Never
        blocks: a download runs beside the loop and wakes it when it ends."""
        mt = self.config.machinetypes[name]
        if not is_remote(mt.image):
            return None
        state = self.images.get(mt.image, mt.image_digest)
        # Told once per state and reason: a download's progress and a failure's countdown to
        # its next try change on every pass and are not news.
        news = state.status if state.status == "downloading" else state.detail.split("; next")[0]
        if self._image_told.get(name) != news:
            self._image_told[name] = news
            level = logging.ERROR if state.status == "failed" else logging.INFO
            LOG.log(level, "machinetype=%s image=%s: %s: %s", name, mt.image, state.status,
                    state.detail)  # fmt: skip
        return state

    def _images_waiting(self) -> set[str]:
        """Machinetypes that may start LMs but have no usable copy of their image yet."""
        waiting = set()
        for name, mt in self.config.machinetypes.items():
            if mt.target_share > 0 and is_remote(mt.image):
                state = self.image_state(name)
                if state is not None and state.path is None:
                    waiting.add(name)
        return waiting

    def histories(self) -> dict[str, slots.TypeHistory]:
        return planning.histories(self.config, self.store, self.space())

    def _start(self, decision: slots.StartDecision, slot: int) -> LmRecord | None:
        mt = self.config.machinetypes[decision.machinetype]
        backend = self.backends.get(mt.backend.value)
        if backend is None:
            LOG.error("machinetype=%s: backend %s not available", mt.name, mt.backend.value)
            return None
        planned = spec.plan(self.config, decision, backend, slot, self.clock())
        record = self.store.insert(planned.record)
        try:
            downloaded = None
            image = self.image_state(mt.name)
            if image is not None:
                if image.path is None:  # it was ready when planned: the copy went meanwhile
                    raise LmrunnerError(f"image {mt.image}: {image.detail}")
                downloaded = image.path
            owner = spec.owner(self.config, backend)
            disk = self.lm_disks.make(record, backend.disk_overhead(record.limits.disk_bytes))
            machine = spec.build(self.config, planned, backend, factory_id=self.store.factory_id,
                                 owner=owner, downloaded=downloaded, disk=disk)  # fmt: skip
            backend.validate(machine)
            cgroup = self.lm_cgroups.make(
                record,
                record.limits,
                owner=owner,
                overhead=backend.memory_overhead(),
                delegate=self.config.factory.cgroup_delegate,
            )
            self.store.transition(record.uuid, LmState.STARTING)
            handle = backend.start(replace(machine, cgroup=cgroup))
        except StoreError:
            raise  # the pass's business; a reconcile settles this LM when the store works
        except Exception as err:  # any failure of one start fails that LM only
            if isinstance(err, LmrunnerError | OSError):
                LOG.error("lm=%s machinetype=%s: start failed: %s", record.name, mt.name, err,
                          extra=lm_fields(record))  # fmt: skip
            else:
                LOG.exception("lm=%s machinetype=%s: start failed", record.name, mt.name,
                              extra=lm_fields(record))  # fmt: skip
            self.endings.fail(self.config, record, start_failed_outcome(str(err)))
            return None
        try:
            record = self.store.transition(
                record.uuid, LmState.RUNNING, handle=handle, started=self.clock()
            )
        except StoreError:
            # Unrecorded, it would run unsupervised: remove it now; a reconcile settles the row.
            with guarded(record.name):
                backend.destroy(record.uuid, handle)
            raise
        LOG.info("lm=%s machinetype=%s processors=%d: started (%s)", record.name, mt.name,
                 decision.processors, decision.reason, extra=lm_fields(record))  # fmt: skip
        return record

    # --- the loop ---------------------------------------------------------------------------------

    def _next_deadline(self, active: list[LmRecord], now: float) -> float:
        deadlines = [self._next_reconcile, self.clock() + self.tuning.idle_wait_seconds]
        for record in active:
            if record.state is LmState.STOPPING and record.stop_deadline is not None:
                deadline: float = record.stop_deadline
            elif record.state is LmState.RUNNING:
                deadline = record.shutdown_time
            else:
                continue
            # A deadline this pass has already acted on (stopped, killed) is not due again: the
            # exit arrives as an event, and idle_wait_seconds bounds a retry. Waiting for it
            # again would make run() spin while an engine is slow to kill.
            if deadline > now:
                deadlines.append(deadline)
        return min(deadlines)

    def next_wait(self) -> float:
        """Seconds until something is due (an event wakes the loop earlier)."""
        return max(self._deadline - self.clock(), 0.0)

    def run(
        self,
        *,
        once: bool = False,
        reload: Callable[[], None] | None = None,
        on_ready: Callable[[], None] | None = None,
        on_pass: Callable[[PassReport], None] | None = None,
        max_wait: float | None = None,
    ) -> None:
        """Adopt, then handle events and deadlines until :meth:`request_stop` (SIGTERM).

        ``reload`` (SIGHUP, through :meth:`request_reload`) runs between passes, never inside
        one. A state directory that cannot be written stops starts until it can; a store that
        cannot be read at all (:class:`StoreError`) ends the loop with that error.

        ``on_ready`` runs once, after the adoption and the first pass; ``on_pass`` after every
        pass, with its report; ``max_wait`` caps the wait between two passes, so that an idle
        loop still runs one (and calls ``on_pass``) that often: the daemon feeds systemd's
        watchdog from here, so a loop that hangs stops feeding it.
        """
        self.adopt()
        first = True
        while True:
            if self.reload_requested.is_set() and reload is not None:
                self.reload_requested.clear()
                with guarded("reload"):
                    reload()
            began = time.monotonic()
            try:
                report = self.run_pass()
            except StoreUnwritable as err:
                self.state_dir.set(self.config.factory.state_dir, str(err))
                report = PassReport(blocked=str(err))
            except StoreError:
                raise
            except Exception:  # a bug in a pass must not end the LMs' supervision: next pass
                LOG.exception("pass failed; the next pass tries again")
                report = PassReport()
            if report.started or report.finished:
                LOG.info("pass: started %s, finished %s", report.started, report.finished)
            self.observer.passed(time.monotonic() - began, self.store_problem)
            if first and on_ready is not None:
                with guarded("on_ready"):
                    on_ready()
            first = False
            if on_pass is not None:
                with guarded("on_pass"):
                    on_pass(report)
            if once or self.stopping_requested.is_set():
                return
            wait = self.next_wait() if max_wait is None else min(self.next_wait(), max_wait)
            try:
                uuid = self.events.get(timeout=wait)
            except queue.Empty:
                continue
            self.events.put(uuid)  # handled by the next pass with everything else that is due

    def request_reload(self) -> None:
        """Ask :meth:`run` to call its ``reload`` before the next pass (SIGHUP)."""
        self.reload_requested.set()
        self.events.put("")

    def reconfigure(self, config: Config, make: Callable[[str], Backend | None]) -> None:
        """Use ``config`` from the next pass on (:mod:`lmrunner.reload`)."""
        config = reloading.pinned(self.config, config)
        self.backends = reloading.remade(
            self.config, config, self.backends, self.store.active(), make, self.event
        )
        for line in reloading.changes(self.config, config):
            LOG.info("reload: %s", line)
        if DownloadSettings.of(config.factory) != self.images.settings:
            self.images.close()
            self.images = self._image_cache(config, self.clock)
        self.config = config

    def request_stop(self) -> None:
        """Stop starting LMs and leave the loop; running LMs keep running (SIGTERM)."""
        self.stopping_requested.set()
        self.events.put("")

    def remove_all(self) -> int:
        """Kill and remove every engine object and cgroup of this factory (tests, demos; never
        the daemon: a factory's LMs outlive it by design); returns how many objects."""
        return remove_all(self.backends, self.store, self.lm_cgroups, self.lm_disks)

    def close(self) -> None:
        self.images.close()
        for backend in self.backends.values():
            backend.close()
