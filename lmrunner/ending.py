"""An LM's end: the outcome decided from the engine's facts and what the payload left, recorded
with its accounting in one transaction; the engine object, the cgroup and the LM's filesystem
removed after that (a reconcile retries each if the daemon dies in between)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from lmrunner import apel, untrusted
from lmrunner.accounting import AccountingRecord, Flag, vo_of
from lmrunner.backends.base import Backend, EngineState, Status
from lmrunner.cgroups import Usage
from lmrunner.config import Config, MachinetypeConfig
from lmrunner.errors import BackendError
from lmrunner.guard import guarded
from lmrunner.lifecycle import (
    LmState,
    Outcome,
    OutcomeSource,
    decide_outcome,
    start_failed_outcome,
)
from lmrunner.lmcgroups import LmCgroups, peak
from lmrunner.lmdisks import LmDisks, outputs_root
from lmrunner.state import LmRecord, Store

LOG = logging.getLogger("lmrunner.factory")
RESTART_OUTCOME = Outcome(100, "Start interrupted by a factory restart", OutcomeSource.START_FAILED)
UNRECORDED_OUTCOME = Outcome(
    500, "Start could not be recorded (state directory not writable)", OutcomeSource.START_FAILED
)


def lm_fields(record: LmRecord, outcome: Outcome | None = None) -> dict[str, object]:
    """``extra=`` for a log line about one LM: the journal's structured fields (LM_NAME, LM_UUID,
    MACHINETYPE, OUTCOME_CODE, OUTCOME_SOURCE: :mod:`lmrunner.service`)."""
    fields: dict[str, object] = {
        "lm_name": record.name,
        "lm_uuid": record.uuid,
        "machinetype": record.machinetype,
    }
    if outcome is not None:
        fields["outcome_code"] = outcome.code
        fields["outcome_source"] = outcome.source.value
    return fields


class Endings:
    """Records LMs' ends for one factory."""

    def __init__(
        self,
        store: Store,
        cgroups: LmCgroups,
        disks: LmDisks,
        clock: Callable[[], float],
        on_end: Callable[[LmRecord], None] | None = None,
    ) -> None:
        self.store = store
        self.cgroups = cgroups
        self.disks = disks
        self.clock = clock
        #: Told of every LM once its end is recorded (VacMon, metrics); never fails an end.
        self.on_end = on_end

    def _tell(self, record: LmRecord) -> None:
        if self.on_end is not None:
            with guarded(record.name):
                self.on_end(record)

    def finish(
        self, config: Config, record: LmRecord, backend: Backend, status: Status
    ) -> LmRecord:
        """Record how an LM the engine no longer runs ended (exactly once), then remove it."""
        mt = config.machinetypes.get(record.machinetype)
        message = untrusted.read_message(outputs_root(record.directory))
        ended = status.ended_at or self.clock()
        usage = self.cgroups.usage(record)
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
            # the engine's end can precede lmrunner's own start stamp, taken after start()
            lifetime=None if record.started is None else max(ended - record.started, 0.0),
            fizzle_seconds=mt.fizzle_seconds if mt else 0,
            engine_fault=status.engine_fault,
        )
        record = self.store.finish(
            record.uuid,
            LmState.FINISHED,
            lambda done: accounting_record(done, usage, mt),
            outcome=outcome,
            finished=ended,
            cpu_seconds=None if usage is None else usage.cpu_seconds,
            memory_peak_bytes=peak(record, usage),
            disk_peak_bytes=self.disks.peak(record),
        )
        if record.handle is not None:
            with guarded(record.name):  # a leftover is removed by a later reconcile
                backend.destroy(record.uuid, record.handle)
        self.publish(config)
        self.cgroups.remove(record)
        self.disks.release(record)
        if outcome.source is not OutcomeSource.PAYLOAD and message is None:
            # Vac wrote its own reason where the payload's would be; keep doing so for tools,
            # but never over (or through) anything the payload left there. After the release:
            # into the kept joboutputs, which a full disk does not refuse.
            try:
                untrusted.create(
                    outputs_root(record.directory),
                    "joboutputs/shutdown_message",
                    (outcome.message + "\n").encode(),
                )
            except (untrusted.UntrustedFileError, OSError) as err:
                LOG.warning("lm=%s: cannot write its shutdown_message: %s", record.name, err)
        LOG.info("lm=%s machinetype=%s: finished: %s (%s)", record.name, record.machinetype,
                 outcome.message, outcome.source, extra=lm_fields(record, outcome))  # fmt: skip
        self._tell(record)
        return record

    def fail(self, config: Config, record: LmRecord, outcome: Outcome) -> LmRecord:
        """End an LM that never ran (its start failed, or was interrupted)."""
        mt = config.machinetypes.get(record.machinetype)
        failed = self.store.finish(
            record.uuid,
            LmState.FAILED,
            lambda ended: accounting_record(ended, None, mt),
            outcome=outcome,
            finished=self.clock(),
        )
        self.publish(config)
        self.cgroups.remove(failed)
        self.disks.release(failed)
        self._tell(failed)
        return failed

    def settle_half_created(
        self, config: Config, record: LmRecord, backend: Backend, outcome: Outcome
    ) -> None:
        """An LM whose start was interrupted (a restart, or a store write that failed): remove
        whatever exists of it, once."""
        try:
            for owned in backend.list_owned():
                if owned.uuid == record.uuid:
                    backend.destroy(owned.uuid, owned.handle)
        except BackendError as err:  # what is left becomes an orphan, removed by a reconcile
            LOG.error("lm=%s: cannot look for its engine object now: %s", record.name, err)
        self.disks.release(record)  # before its folder goes: rmtree must not walk into it
        untrusted.remove_tree(record.directory)
        self.fail(config, record, outcome)
        LOG.warning("lm=%s: half-created (%s); removed", record.name, outcome.text,
                    extra=lm_fields(record, outcome))  # fmt: skip

    def backfill(self, config: Config) -> None:
        """Accounting records for ended LMs that have none (an older lmrunner wrote them in a
        transaction of their own, after the end)."""
        for record in self.store.unaccounted():
            with guarded(record.name):
                mt = config.machinetypes.get(record.machinetype)
                if self.store.add_accounting(accounting_record(record, None, mt)):
                    LOG.warning("lm=%s: accounting record backfilled", record.name)

    def publish(self, config: Config) -> None:
        """Write the APEL messages not written yet (after each end, and on every reconcile)."""
        try:
            apel.publish(self.store, config.factory)
        except OSError as err:  # retried by the next reconcile
            LOG.error("cannot write APEL records now: %s", err)


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
        disk_peak_bytes=record.disk_peak_bytes,
    )
