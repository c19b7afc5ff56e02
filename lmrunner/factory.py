"""The factory: starts LMs, notices their ends, enforces limits, and survives its own restarts.

One thread owns the store and makes every decision; backends only push "this LM may have ended"
notifications (uuids) into a queue. :meth:`Factory.run` waits on that queue until the next
deadline (an LM's shutdowntime, a stop's grace period, a heartbeat check, the periodic
reconcile), so an exit is handled, accounted and its processors reused within a second, without
Vac's fixed 60 s cycle.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import queue
import random
import threading
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from lmrunner import apel, payload, slots, untrusted
from lmrunner.accounting import AccountingRecord, Flag, vo_of
from lmrunner.backends.base import (
    LABEL_FACTORY,
    LABEL_NAME,
    LABEL_UUID,
    Backend,
    EngineState,
    Health,
    LmCgroup,
    MachineSpec,
    Owned,
    Status,
)
from lmrunner.cgroups import CgroupController, CgroupRef, Usage, open_controller
from lmrunner.config import Config, FactoryConfig, MachinetypeConfig, resolve_local
from lmrunner.errors import (
    BackendError,
    BackendUnavailable,
    CgroupError,
    CgroupUnsupported,
    LmrunnerError,
    MachineNotFound,
)
from lmrunner.lifecycle import (
    LmState,
    Outcome,
    OutcomeSource,
    decide_outcome,
    heartbeat_outcome,
    operator_outcome,
    start_failed_outcome,
    wallclock_outcome,
)
from lmrunner.state import LmRecord, Store, StoreError, StoreUnwritable

LOG = logging.getLogger(__name__)
CLEANUP_SECONDS = 3600.0  # LM directories live for days: an hourly look is enough
#: Below this much free space (or read-only) in the state directory no LM starts: the store,
#: the LM folders and the APEL records live there, and what is recorded must stay recordable.
MIN_FREE_BYTES = 32 * 1024 * 1024
RESTART_OUTCOME = Outcome(100, "Start interrupted by a factory restart", OutcomeSource.START_FAILED)
UNRECORDED_OUTCOME = Outcome(
    500, "Start could not be recorded (state directory not writable)", OutcomeSource.START_FAILED
)


def host_cgroups(factory: FactoryConfig) -> CgroupController | None:
    """The host's cgroup controller for ``factory.cgroup_parent``; None (logged) when this host
    gives lmrunner no cgroups, in which case only engines with their own limits enforce any."""
    try:
        return open_controller(factory.cgroup_parent, memory_high_ratio=factory.memory_high_ratio)
    except CgroupUnsupported as err:
        LOG.warning("no cgroups for LMs (limits only where the engine sets them): %s", err)
        return None


def cgroup_name(uuid: str) -> str:
    """An LM's cgroup: by uuid, since LM names are reused slot by slot."""
    return f"lm-{uuid}"


@dataclass(frozen=True, slots=True)
class Tuning:
    """How eagerly the factory works (defaults suit production; tests shorten them)."""

    max_starts_per_pass: int = 8  # several LMs per pass, not Vac's one per minute
    reconcile_seconds: float = 30.0  # catch anything a backend failed to report
    orphan_grace_seconds: float = 300.0  # labelled engine objects without a record
    idle_wait_seconds: float = 5.0  # re-plan at least this often when processors are free
    min_free_bytes: int = MIN_FREE_BYTES  # in the state directory's filesystem, to start LMs


@dataclass
class PassReport:
    """What one pass did (for logs, ``--once`` and tests)."""

    started: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    stopping: list[str] = field(default_factory=list)
    blocked: str | None = None


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
    ) -> None:
        self.config = config
        self.store = store
        self.backends = backends
        self.cgroups = cgroups
        self.tuning = tuning
        self.clock = clock
        self.rng = rng or random.Random()
        self.load_average = load_average
        self.events: queue.Queue[str] = queue.Queue()
        self.stopping_requested = threading.Event()
        self.reload_requested = threading.Event()
        #: Why the state directory cannot take more now (full, read-only); None when it can.
        self.store_problem: str | None = None
        self.started_at = clock()
        self._orphans_seen: dict[str, float] = {}
        self.unavailable: dict[str, str] = {}  # backend -> why (its machinetypes do not start)
        self._next_reconcile = 0.0
        self._next_cleanup = 0.0
        self._deadline = 0.0

    # --- start-up and adoption -------------------------------------------------------------

    def adopt(self) -> PassReport:
        """After a (re)start: reattach to every running LM and settle the half-done ones."""
        report = PassReport()
        for each in self.backends.values():
            each.watch(self.events.put)
        for record in self.store.active():
            with self._guard(record.name):
                self._adopt(record, report)
        for record in self.store.unaccounted():
            with self._guard(record.name):  # ended under an lmrunner that accounted apart
                mt = self.config.machinetypes.get(record.machinetype)
                if self.store.add_accounting(accounting_record(record, None, mt)):
                    LOG.warning("lm=%s: accounting record backfilled", record.name)
        return report

    def _adopt(self, record: LmRecord, report: PassReport) -> None:
        backend = self.backends.get(record.backend)
        if backend is None:
            LOG.error(
                "lm=%s backend=%s: backend not available; left alone", record.name, record.backend
            )
            return
        if record.state is LmState.CREATING or (
            record.state is LmState.STARTING and record.handle is None
        ):
            self._settle_half_created(record, backend)
            report.finished.append(record.name)
            return
        assert record.handle is not None
        try:
            backend.recover(record.uuid, record.handle)
        except MachineNotFound:
            LOG.warning("lm=%s: gone from %s while lmrunner was down", record.name, record.backend)
        except BackendError as err:
            LOG.error("lm=%s: cannot reattach now: %s", record.name, err)
        self.events.put(record.uuid)  # inspect it in the next pass: it may have ended meanwhile
        LOG.info("lm=%s machinetype=%s: adopted", record.name, record.machinetype)

    @contextlib.contextmanager
    def _guard(self, name: str) -> Iterator[None]:
        """One LM's work: whatever goes wrong with it is logged with its name and retried by a
        later pass or reconcile, never the daemon's end. Store errors are the pass's business
        (:meth:`run`): a full or broken state directory concerns every LM."""
        try:
            yield
        except StoreError:
            raise
        except LmrunnerError as err:
            LOG.error("lm=%s: %s (retried later)", name, err)
        except Exception:  # a bug or an engine's surprise: one LM's, never the factory's
            LOG.exception("lm=%s: unexpected error (retried later)", name)

    def _settle_half_created(
        self, record: LmRecord, backend: Backend, outcome: Outcome = RESTART_OUTCOME
    ) -> None:
        """An LM whose start was interrupted (a restart, or a store write that failed): remove
        whatever exists of it, once."""
        try:
            for owned in backend.list_owned():
                if owned.uuid == record.uuid:
                    backend.destroy(owned.uuid, owned.handle)
        except BackendError as err:  # what is left becomes an orphan, removed by a reconcile
            LOG.error("lm=%s: cannot look for its engine object now: %s", record.name, err)
        untrusted.remove_tree(record.directory)
        mt = self.config.machinetypes.get(record.machinetype)
        record = self.store.finish(
            record.uuid,
            LmState.FAILED,
            lambda ended: accounting_record(ended, None, mt),
            outcome=outcome,
            finished=self.clock(),
        )
        self._publish()
        self._remove_cgroup(record)
        LOG.warning("lm=%s: half-created (%s); removed", record.name, outcome.text)

    # --- one pass ---------------------------------------------------------------------------

    def run_pass(self) -> PassReport:
        """Handle everything that is due now; return what was done."""
        report = PassReport()
        now = self.clock()
        self._deadline = now + self.tuning.idle_wait_seconds  # if this pass ends early
        self._check_state_dir()
        self._handle_requests(report)
        self._handle_events(report)
        if now >= self._next_reconcile:
            self._next_reconcile = now + self.tuning.reconcile_seconds
            self._reconcile(report)
        # One read of the active LMs serves enforcement, planning and the next wait: this pass
        # runs after every exit, and the table can hold thousands of LMs.
        active = self._enforce(report, self.store.active())
        if self.store_problem is not None:
            report.blocked = self.store_problem
        elif not self.stopping_requested.is_set():
            active += self._start_lms(report, active)
        self._deadline = self._next_deadline(active, now)
        return report

    def _check_state_dir(self) -> None:
        """Start nothing while the state directory is full or read-only (one log line when that
        begins and one when it ends); what is recorded stays, ends are recorded when they can."""
        problem = None
        try:
            info = os.statvfs(self.config.factory.state_dir)
        except OSError as err:
            problem = f"cannot look at it: {err}"
        else:
            if info.f_flag & os.ST_RDONLY:
                problem = "its filesystem is read-only"
            elif info.f_bavail * info.f_frsize < self.tuning.min_free_bytes:
                free = info.f_bavail * info.f_frsize / 2**20
                problem = f"its filesystem is full ({free:.0f} MiB free)"
        if problem is None and self.store_problem is not None:
            try:  # writable again? (a write failed last time)
                self.store.set_meta("writable_at", str(self.clock()))
            except StoreUnwritable as err:
                problem = str(err)
        self._set_store_problem(problem)

    def _set_store_problem(self, problem: str | None) -> None:
        if problem is not None and self.store_problem is None:
            LOG.error(
                "state directory %s: %s; no LM starts until it can take more",
                self.config.factory.state_dir,
                problem,
            )
        elif problem is None and self.store_problem is not None:
            LOG.warning(
                "state directory %s: writable again; starting LMs", self.config.factory.state_dir
            )
        self.store_problem = problem

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
            if record is None or not record.active or record.handle is None:
                continue
            with self._guard(record.name):
                self._check(record, report)

    def _check(self, record: LmRecord, report: PassReport) -> None:
        """Ask the engine about an LM; finalise it when it has ended."""
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
            self._finalise(record, backend, status)
            report.finished.append(record.name)

    def _finalise(self, record: LmRecord, backend: Backend, status: Status) -> None:
        """Record how the LM ended (exactly once), then remove its engine object."""
        mt = self.config.machinetypes.get(record.machinetype)
        fizzle = mt.fizzle_seconds if mt else 0
        message = untrusted.read_message(record.directory)
        ended = status.ended_at or self.clock()
        usage = self._usage(record)
        # The cgroup counts OOM kills the engine may not report (a payload's child, an adopted
        # process whose status is unknown); a payload that exited 0 survived its child's.
        oom = status.oom_killed or (
            usage is not None and usage.oom_kills > 0 and status.exit_code != 0
        )
        outcome = decide_outcome(
            message=message,
            stop_reason=record.stop_reason,
            exit_code=status.exit_code,
            oom_killed=oom,
            lost=status.state is EngineState.MISSING,
            lifetime=None if record.started is None else ended - record.started,
            fizzle_seconds=fizzle,
            interrupted=status.interrupted,
        )
        # State, outcome and accounting in one transaction; removing the engine object and the
        # cgroup come after, and a reconcile retries them if the daemon dies in between.
        record = self.store.finish(
            record.uuid,
            LmState.FINISHED,
            lambda done: accounting_record(done, usage, mt),
            outcome=outcome,
            finished=ended,
            cpu_seconds=None if usage is None else usage.cpu_seconds,
            memory_peak_bytes=_peak(record, usage),
        )
        if outcome.source is not OutcomeSource.PAYLOAD and message is None:
            # Vac wrote its own reason where the payload's would be; keep doing so for tools,
            # but never over (or through) anything the payload left there.
            try:
                untrusted.create(
                    record.directory,
                    "joboutputs/shutdown_message",
                    (outcome.message + "\n").encode(),
                )
            except (untrusted.UntrustedFileError, OSError) as err:
                LOG.warning("lm=%s: cannot write its shutdown_message: %s", record.name, err)
        if record.handle is not None:
            with self._guard(record.name):  # a leftover is removed by a later reconcile
                backend.destroy(record.uuid, record.handle)
        self._publish()
        self._remove_cgroup(record)
        LOG.info(
            "lm=%s machinetype=%s: finished: %s (%s)",
            record.name,
            record.machinetype,
            outcome.message,
            outcome.source,
        )

    # --- cgroups and accounting -----------------------------------------------------------

    def _cgroup(self, record: LmRecord) -> CgroupRef | None:
        if record.cgroup is None:
            return None
        try:
            return CgroupRef.from_json(record.cgroup)
        except CgroupError as err:
            LOG.error("lm=%s: unreadable cgroup reference: %s", record.name, err)
            return None

    def _usage(self, record: LmRecord) -> Usage | None:
        """The LM's cgroup counters, None when it has no cgroup (or they cannot be read)."""
        ref = self._cgroup(record)
        if ref is None or self.cgroups is None:
            return None
        try:
            return self.cgroups.usage(ref)
        except CgroupError as err:
            LOG.error("lm=%s: cannot read its cgroup: %s", record.name, err)
            return None

    def _make_cgroup(
        self, record: LmRecord, owner: tuple[int, int], overhead: int = 0
    ) -> LmCgroup | None:
        """Create and limit the LM's cgroup before its engine starts anything (and delegate it
        to the LM's account when configured)."""
        if self.cgroups is None:
            return None
        limits = record.limits
        ref = self.cgroups.create(cgroup_name(record.uuid))
        self.store.update(record.uuid, cgroup=ref.to_json())  # before anything can run in it
        self.cgroups.set_limits(
            ref,
            cpus=float(limits.processors),
            memory_bytes=limits.memory_bytes + overhead,  # the LM's, plus its engine's own
            swap_bytes=limits.swap_bytes,
            pids=limits.pids or 4_194_304,  # 0 means unlimited: the kernel's PID_MAX_LIMIT
        )
        if self.config.factory.cgroup_delegate and owner[0] != 0:
            self.cgroups.delegate(ref, *owner)
        return LmCgroup(
            ref=ref,
            procs_files=self.cgroups.procs_files(ref),
            engine_path=self.cgroups.engine_path(ref),
        )

    def _remove_cgroup(self, record: LmRecord) -> bool:
        """Kill what is left in an ended LM's cgroup and remove it; False to retry later."""
        ref = self._cgroup(record)
        if ref is None or self.cgroups is None:
            return record.cgroup is None
        try:
            self.cgroups.kill(ref)
            self.cgroups.remove(ref)
        except CgroupError as err:
            LOG.error("lm=%s: cannot remove its cgroup yet: %s", record.name, err)
            return False
        self.store.update(record.uuid, cgroup=None)
        return True

    def _remove_unrecorded_cgroups(self) -> None:
        """Cgroups of this factory's ended LMs that their row does not name (the daemon died
        between making one and recording it). Other factories' cgroups under a shared parent
        are never touched: only uuids this store knows count."""
        if self.cgroups is None:
            return
        for name in self.cgroups.names():
            record = self.store.get(name.removeprefix("lm-")) if name.startswith("lm-") else None
            if record is None or record.active or record.cgroup is not None:
                continue
            ref = self.cgroups.existing(name)
            if ref is None:
                continue
            try:
                self.cgroups.kill(ref)
                self.cgroups.remove(ref)
            except CgroupError as err:
                LOG.error("lm=%s: cannot remove its unrecorded cgroup: %s", record.name, err)
            else:
                LOG.warning("lm=%s: removed a cgroup its record did not name", record.name)

    def _publish(self) -> None:
        """Write the APEL messages not written yet (after each end, and on every reconcile)."""
        try:
            apel.publish(self.store, self.config.factory)
        except OSError as err:  # retried by the next reconcile
            LOG.error("cannot write APEL records now: %s", err)

    def _sample_memory(self, active: list[LmRecord]) -> None:
        """Keep a sampled peak where the kernel keeps none (cgroup v2 before Linux 5.19)."""
        for record in active:
            usage = self._usage(record)
            if usage is None or usage.memory_peak_bytes is not None:
                continue
            if usage.memory_bytes > (record.memory_peak_bytes or 0):
                self.store.update(record.uuid, memory_peak_bytes=usage.memory_bytes)

    def _reconcile(self, report: PassReport) -> None:
        """Inspect every active LM, and remove labelled engine objects nobody owns."""
        active = {record.uuid: record for record in self.store.active()}
        for record in active.values():
            if record.handle is not None and record.state in (LmState.RUNNING, LmState.STOPPING):
                with self._guard(record.name):
                    self._check(record, report)
            elif record.handle is None and record.backend in self.backends:
                # Half-created outside any start (one thread starts LMs): its start could not
                # be recorded; what exists of it must not run unsupervised.
                with self._guard(record.name):
                    self._settle_half_created(
                        record, self.backends[record.backend], UNRECORDED_OUTCOME
                    )
                    report.finished.append(record.name)
        self._sample_memory(self.store.active())  # afresh: some ended in the checks above
        for record in self.store.leftover_cgroups():
            with self._guard(record.name):
                self._remove_cgroup(record)
        self._remove_unrecorded_cgroups()
        self._publish()
        now = self.clock()
        seen: set[str] = set()
        for backend in self.backends.values():
            probe = backend.probe()
            if probe.health is not Health.OK:
                self._unavailable(backend, probe.detail)
                continue
            if self.unavailable.pop(backend.name, None) is not None:
                LOG.info("backend=%s: available again (%s)", backend.name, probe.detail)
            try:
                owned_objects = backend.list_owned()
            except BackendError as err:
                self._unavailable(backend, err)
                continue
            for owned in owned_objects:
                if owned.factory != self.store.factory_id or owned.uuid in active:
                    continue
                seen.add(owned.uuid)
                with self._guard(owned.name):
                    self._reap(backend, owned, now)
        # Forget orphans that are gone (removed, or finished LMs' leftovers destroyed above).
        self._orphans_seen = {uuid: t for uuid, t in self._orphans_seen.items() if uuid in seen}
        if now >= self._next_cleanup:
            self.cleanup_directories()
            self._next_cleanup = now + CLEANUP_SECONDS

    def _reap(self, backend: Backend, owned: Owned, now: float) -> None:
        """An engine object of this factory that no active LM holds: a finished LM's leftover
        (its destroy failed or the daemon died first) goes now, an unknown one after a grace."""
        known = self.store.get(owned.uuid)
        first = self._orphans_seen.setdefault(owned.uuid, now)
        if known is not None and not known.active:
            backend.destroy(owned.uuid, owned.handle)
            self._orphans_seen.pop(owned.uuid, None)
            LOG.info("lm=%s: engine object of the ended LM removed", owned.name)
        elif now - first >= self.tuning.orphan_grace_seconds:
            LOG.warning("orphan %s (%s) of %s: no record; removing", owned.name, owned.uuid,
                        backend.name)  # fmt: skip
            backend.destroy(owned.uuid, owned.handle)
            self._orphans_seen.pop(owned.uuid, None)
        else:
            LOG.warning("orphan %s (%s) of %s: no record; removal after grace", owned.name,
                        owned.uuid, backend.name)  # fmt: skip

    def _unavailable(self, backend: Backend, why: object) -> None:
        """Start no LM of this backend until a reconcile finds it working; keep the others."""
        if backend.name not in self.unavailable:
            LOG.error("backend=%s: unavailable, its machinetypes wait: %s", backend.name, why)
        self.unavailable[backend.name] = str(why)

    def _handle_requests(self, report: PassReport) -> None:
        for uuid, action, grace in self.store.take_requests():
            record = self.store.get(uuid)
            if record is None or not record.active or record.handle is None:
                continue
            force = action == "kill"
            with self._guard(record.name):
                self._stop(record, operator_outcome(force), grace=0 if force else grace)
                report.stopping.append(record.name)

    def _stop(self, record: LmRecord, reason: Outcome, *, grace: float | None = None) -> LmRecord:
        """Ask an LM to stop; it is killed when its grace period runs out."""
        backend = self.backends.get(record.backend)
        if backend is None or record.handle is None:
            return record
        mt = self.config.machinetypes.get(record.machinetype)
        seconds = grace if grace is not None else (mt.stop_grace_seconds if mt else 60)
        if record.state is not LmState.STOPPING:
            record = self.store.transition(
                record.uuid,
                LmState.STOPPING,
                stop_reason=reason,
                stop_deadline=self.clock() + seconds,
            )
        assert record.handle is not None
        try:
            backend.stop(record.uuid, record.handle, force=seconds <= 0)
        except BackendError as err:  # the kill is retried when the grace period is over
            LOG.error("lm=%s: cannot signal it now: %s", record.name, err)
        LOG.info("lm=%s: stopping (%s), kill after %.0f s", record.name, reason.message, seconds)
        return record

    def _enforce(self, report: PassReport, active: list[LmRecord]) -> list[LmRecord]:
        """Shutdowntimes, heartbeat files, and grace periods that ran out; returns ``active``
        as it is afterwards."""
        now = self.clock()
        out = []
        for record in active:
            out.append(record)
            if record.handle is not None:
                with self._guard(record.name):
                    out[-1] = self._enforce_one(report, record, now)
        return out

    def _enforce_one(self, report: PassReport, record: LmRecord, now: float) -> LmRecord:
        assert record.handle is not None
        if record.state is LmState.STOPPING:
            if record.stop_deadline is not None and now >= record.stop_deadline:
                backend = self.backends.get(record.backend)
                if backend is not None:
                    try:
                        backend.stop(record.uuid, record.handle, force=True)
                    except BackendError as err:
                        self._unavailable(backend, err)
            return record
        if record.state is not LmState.RUNNING:
            return record
        factory_end = self.config.factory.shutdown_time
        if factory_end is not None and factory_end < record.shutdown_time:
            try:
                payload.update_shutdowntime(record.directory, factory_end)
            except OSError as err:  # its folder vanished: the record still gets the time
                LOG.error("lm=%s: cannot lower its shutdowntime files: %s", record.name, err)
            record = self.store.update(record.uuid, shutdown_time=factory_end)
        reason = wallclock_outcome() if now >= record.shutdown_time else None
        reason = reason or self._heartbeat_problem(record, now)
        if reason is not None:
            record = self._stop(record, reason)
            report.stopping.append(record.name)
        return record

    def _heartbeat_problem(self, record: LmRecord, now: float) -> Outcome | None:
        """Vac's rule (vac.md §3.6), with its grace after a daemon (re)start."""
        mt = self.config.machinetypes.get(record.machinetype)
        if (
            mt is None
            or mt.heartbeat_file is None
            or mt.fizzle_seconds <= 0
            or record.started is None
        ):
            return None
        # Only once both are *more than* fizzle_seconds ago (Vac: started < now - fizzle_seconds).
        if now - record.started <= mt.fizzle_seconds or now - self.started_at <= mt.fizzle_seconds:
            return None
        # lstat of a regular file only: a link to a fresh host file is no heartbeat.
        beat = untrusted.lstat_regular(record.directory / "joboutputs", mt.heartbeat_file)
        if beat is None:
            return heartbeat_outcome(created=False)
        if mt.heartbeat_seconds > 0 and now - beat.st_mtime > mt.heartbeat_seconds:
            return heartbeat_outcome(created=True)
        return None

    # --- starting ----------------------------------------------------------------------------

    def _start_lms(self, report: PassReport, active: list[LmRecord]) -> list[LmRecord]:
        """Start what the planner decides; returns the new records."""
        now = self.clock()
        running = [
            slots.RunningLm(
                r.machinetype, r.processors, r.hs06, r.shutdown_time, r.created, r.started
            )
            for r in active
        ]
        histories = self.histories()
        config = self.config
        usable = {
            name: mt
            for name, mt in config.machinetypes.items()
            if mt.backend.value in self.backends and mt.backend.value not in self.unavailable
        }
        if len(usable) < len(config.machinetypes):  # the others' engines are missing or down
            config = replace(config, machinetypes=usable)
        if self.store.meta("draining") == "1":  # `lmrunner drain`, on top of the configuration
            config = replace(config, factory=replace(config.factory, draining=True))
        decisions = slots.plan(
            config,
            running,
            histories,
            now=now,
            load_average=self.load_average(),
            counted_cpus=os.cpu_count() or 1,
            rng=self.rng,
            max_starts=self.tuning.max_starts_per_pass,
        )
        if isinstance(decisions, slots.Blocked):
            report.blocked = decisions.reason
            return []
        used = {record.slot for record in active}
        free = (slot for slot in range(self.config.factory.total_processors) if slot not in used)
        started = []
        for decision, slot in zip(decisions, free, strict=False):
            if self.stopping_requested.is_set():  # SIGTERM arrived during this pass
                break
            record = None
            with self._guard(f"slot {slot}"):
                record = self._start(decision, slot)
            if record is not None:
                report.started.append(record.name)
                started.append(record)
        return started

    def histories(self) -> dict[str, slots.TypeHistory]:
        """Vac's backoff input: the end of the most recently created finished LM, if an abort."""
        out: dict[str, slots.TypeHistory] = {}
        for name, record in self.store.last_finished(self.config.machinetypes).items():
            aborted = record.outcome is not None and record.outcome.abort
            out[name] = slots.TypeHistory(last_abort=record.finished if aborted else None)
        return out

    def _start(self, decision: slots.StartDecision, slot: int) -> LmRecord | None:
        mt = self.config.machinetypes[decision.machinetype]
        backend = self.backends.get(mt.backend.value)
        if backend is None:
            LOG.error("machinetype=%s: backend %s not available", mt.name, mt.backend.value)
            return None
        factory = self.config.factory
        created = self.clock()
        name = payload.lm_name(factory.hostname, slot)
        identity = payload.LmIdentity(name=name, uuid=str(uuid_mod.uuid4()), machinetype=mt.name)
        # Vac's <created>_<machinetype>_<name>, plus the uuid: names are reused within a second.
        directory = (
            factory.state_dir / "machines" / f"{int(created)}_{mt.name}_{name}_{identity.uuid[:8]}"
        )
        limits = payload.limits_for(self.config, mt, decision.processors)
        record = self.store.insert(
            LmRecord(
                uuid=identity.uuid,
                name=name,
                machinetype=mt.name,
                backend=backend.name,
                slot=slot,
                processors=decision.processors,
                limits=limits,
                hs06=(factory.hs06_per_processor or 1.0) * decision.processors,
                shutdown_time=decision.shutdown_time,
                directory=directory,
                created=created,
            )
        )
        try:
            owner = self._owner(backend)
            prepared = payload.prepare(
                self.config,
                mt,
                identity,
                placement=backend.placement,
                processors=decision.processors,
                created=int(created),
                shutdown_time=decision.shutdown_time,
                lm_dir=directory,
                owner=owner,
            )
            spec = self._spec(mt, identity, prepared, owner)
            backend.validate(spec)
            spec = replace(spec, cgroup=self._make_cgroup(record, owner, backend.memory_overhead()))
            self.store.transition(record.uuid, LmState.STARTING)
            handle = backend.start(spec)
        except StoreError:
            raise  # the pass's business: the LM is settled after a restart or by a later pass
        except Exception as err:  # any failure of one start fails that LM only
            if isinstance(err, LmrunnerError | OSError):
                LOG.error("lm=%s machinetype=%s: start failed: %s", name, mt.name, err)
            else:
                LOG.exception("lm=%s machinetype=%s: start failed unexpectedly", name, mt.name)
            failed = self.store.finish(
                record.uuid,
                LmState.FAILED,
                lambda ended: accounting_record(ended, None, mt),
                outcome=start_failed_outcome(str(err)),
                finished=self.clock(),
            )
            self._publish()
            self._remove_cgroup(failed)
            return None
        try:
            record = self.store.transition(
                record.uuid, LmState.RUNNING, handle=handle, started=self.clock()
            )
        except StoreError:
            # Unrecorded, it would run unsupervised: remove it now; a reconcile settles the row.
            with self._guard(name):
                backend.destroy(identity.uuid, handle)
            raise
        LOG.info(
            "lm=%s machinetype=%s processors=%d: started (%s)",
            name,
            mt.name,
            decision.processors,
            decision.reason,
        )
        return record

    def _owner(self, backend: Backend) -> tuple[int, int]:
        if not backend.runs_as_sc_user:
            return (os.getuid(), os.getgid())
        try:
            account = pwd.getpwnam(self.config.factory.sc_user)
        except KeyError as err:
            raise LmrunnerError(
                f"factory.sc_user: no account {self.config.factory.sc_user!r}"
            ) from err
        return (account.pw_uid, account.pw_gid)

    def _spec(
        self,
        mt: MachinetypeConfig,
        identity: payload.LmIdentity,
        prepared: payload.Prepared,
        owner: tuple[int, int],
    ) -> MachineSpec:
        return MachineSpec(
            uuid=identity.uuid,
            name=identity.name,
            machinetype=mt.name,
            image=self._image(mt),
            command=(mt.container_command,),
            limits=prepared.limits,
            mounts=prepared.mounts,
            env=prepared.env,
            labels={
                LABEL_FACTORY: self.store.factory_id,
                LABEL_NAME: identity.name,
                LABEL_UUID: identity.uuid,
            },
            directory=prepared.directory,
            owner=owner,
            stop_grace_seconds=mt.stop_grace_seconds,
            options={
                "capabilities": mt.capabilities,
                "vm_initrd": None
                if mt.vm_initrd is None
                else str(resolve_local(mt.vm_initrd, self.config.files_dir(mt.name))),
                "vm_kernel_append": mt.vm_kernel_append,
                "vm_network": mt.vm_network,
            },
        )

    def _image(self, mt: MachinetypeConfig) -> str:
        """The machinetype's image, a relative file name resolved in its files folder (engine
        references such as docker://, oras:// or a Docker image name are passed through)."""
        if "://" in mt.image:
            return mt.image
        candidate = resolve_local(mt.image, self.config.files_dir(mt.name))
        return str(candidate) if candidate.exists() else mt.image

    # --- housekeeping ---------------------------------------------------------------------------

    def cleanup_directories(self) -> list[Path]:
        """Remove LM directories older than their machinetype's ``machines_dir_days``."""
        removed = []
        now = self.clock()
        kept = [mt.machines_dir_days for mt in self.config.machinetypes.values()]
        youngest = min(
            [d for d in kept if d > 0] + [3.0]
        )  # 3.0: Vac's default, for machinetypes no longer configured
        for record in self.store.ended_before(now - youngest * 86400, cleaned=False):
            if record.finished is None:
                continue
            mt = self.config.machinetypes.get(record.machinetype)
            days = mt.machines_dir_days if mt else 3.0
            if days > 0 and now - record.finished > days * 86400:  # 0: kept forever
                untrusted.remove_tree(record.directory)
                self.store.update(record.uuid, cleaned=True)
                removed.append(record.directory)
        return removed

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

    def run(self, *, once: bool = False, reload: Callable[[], None] | None = None) -> None:
        """Adopt, then handle events and deadlines until :meth:`request_stop` (SIGTERM).

        ``reload`` (SIGHUP, through :meth:`request_reload`) runs between passes, never inside
        one. A state directory that cannot be written stops starts until it can; a store that
        cannot be read at all (:class:`StoreError`) ends the loop with that error.
        """
        self.adopt()
        while True:
            if self.reload_requested.is_set() and reload is not None:
                self.reload_requested.clear()
                with self._guard("reload"):
                    reload()
            try:
                report = self.run_pass()
            except StoreUnwritable as err:
                self._set_store_problem(str(err))
                report = PassReport(blocked=str(err))
            except StoreError:
                raise
            except Exception:  # a bug in a pass must not end the LMs' supervision: next pass
                LOG.exception("pass failed; the next pass tries again")
                report = PassReport()
            if report.started or report.finished:
                LOG.info("pass: started %s, finished %s", report.started, report.finished)
            if once or self.stopping_requested.is_set():
                return
            try:
                uuid = self.events.get(timeout=self.next_wait())
            except queue.Empty:
                continue
            self.events.put(uuid)  # handled by the next pass with everything else that is due

    def request_reload(self) -> None:
        """Ask :meth:`run` to call its ``reload`` before the next pass (SIGHUP)."""
        self.reload_requested.set()
        self.events.put("")

    def reconfigure(self, config: Config, make: Callable[[str], Backend | None]) -> None:
        """Use ``config`` from the next pass on. Backends it needs that are missing, or all of
        them when the factory settings changed, are made anew with ``make(name)``, watched and
        reattached to their running LMs. Running LMs of a machinetype that is gone run on and
        are finalised as usual. The state directory and cgroup parent change only at a restart
        (the store and the running LMs' cgroups live there)."""
        old = self.config.factory
        if (config.factory.state_dir, config.factory.cgroup_parent) != (
            old.state_dir,
            old.cgroup_parent,
        ):
            LOG.warning("factory.state_dir and factory.cgroup_parent change at a restart only")
            config = replace(
                config,
                factory=replace(config.factory, state_dir=old.state_dir,
                                cgroup_parent=old.cgroup_parent),
            )  # fmt: skip
        active = self.store.active()
        needed = {mt.backend.value for mt in config.machinetypes.values()}
        needed |= {record.backend for record in active}
        remake = needed if config.factory != old else needed - set(self.backends)
        backends = dict(self.backends)
        for name in sorted(remake):
            fresh = make(name)
            if fresh is None:
                continue  # not in this lmrunner; reported when the daemon started
            if name in backends:
                backends[name].close()
            backends[name] = fresh
            fresh.watch(self.events.put)
            for record in active:
                if record.backend == name and record.handle is not None:
                    with self._guard(record.name), contextlib.suppress(MachineNotFound):
                        fresh.recover(record.uuid, record.handle)
                    self.events.put(record.uuid)
            LOG.info("backend=%s: made anew for the new configuration", name)
        self.backends = backends
        self.config = config

    def request_stop(self) -> None:
        """Stop starting LMs and leave the loop; running LMs keep running (SIGTERM)."""
        self.stopping_requested.set()
        self.events.put("")

    def remove_all(self) -> int:
        """Kill and remove every engine object of this factory (tests, demos); returns how many.

        Never used by the daemon itself: a factory's LMs outlive it by design.
        """
        count = 0
        for backend in self.backends.values():
            try:
                for owned in backend.list_owned():
                    if owned.factory == self.store.factory_id:
                        backend.stop(owned.uuid, owned.handle, force=True)
                        backend.destroy(owned.uuid, owned.handle)
                        count += 1
            except BackendError as err:
                LOG.error("backend=%s: cannot remove this factory's objects: %s", backend.name, err)
        for record in self.store.active():
            self._remove_cgroup(record)
        return count

    def close(self) -> None:
        for backend in self.backends.values():
            backend.close()


def _peak(record: LmRecord, usage: Usage | None) -> int | None:
    """The kernel's peak, else the highest sample taken while the LM ran."""
    if usage is None:
        return record.memory_peak_bytes
    if usage.memory_peak_bytes is not None:
        return usage.memory_peak_bytes
    return max(usage.memory_bytes, record.memory_peak_bytes or 0)


def accounting_record(
    record: LmRecord, usage: Usage | None, mt: MachinetypeConfig | None
) -> AccountingRecord:
    """The accounting record of an ended LM (``usage``: its cgroup's last counters, None when
    not measured now; a record's own CPU figure still counts)."""
    assert record.finished is not None
    wall = 0.0 if record.started is None else max(record.finished - record.started, 0.0)
    flags = set()
    if record.started is None:
        flags.add(Flag.FAILED)
    elif mt is not None and wall < mt.fizzle_seconds:
        flags.add(Flag.SHORT)
    if usage is None and record.cpu_seconds is None:
        flags.add(Flag.UNMEASURED)
    oom_kills = 0 if usage is None else usage.oom_kills
    outcome = record.outcome or start_failed_outcome("unknown")
    if oom_kills or outcome.source is OutcomeSource.OOM:
        flags.add(Flag.OOM)
    fqan = mt.accounting_fqan if mt is not None else None
    return AccountingRecord(
        uuid=record.uuid,
        name=record.name,
        machinetype=record.machinetype,
        backend=record.backend,
        fqan=fqan,
        vo=vo_of(fqan),
        processors=record.processors,
        # As the LM started: its limits hold the HS06 it was announced with.
        hs06=None if record.limits.hs06 is None else record.limits.hs06 / record.processors,
        created=record.created,
        started=record.started,
        finished=record.finished,
        wall_seconds=wall,
        cpu_seconds=record.cpu_seconds,
        memory_peak_bytes=record.memory_peak_bytes,
        oom_kills=oom_kills,
        outcome_code=outcome.code,
        outcome_text=outcome.text,
        outcome_source=outcome.source.value,
        flags=frozenset(flags),
        memory_limit_bytes=record.limits.memory_bytes,
    )
