"""Stopping LMs and the limits on their lives: the operator's stop and kill, the shutdown time
(the LM's, lowered by the factory's), the heartbeat file, and the kill once a stop's grace period
ran out. The rules themselves are pure functions in :mod:`lmrunner.lifecycle`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from lmrunner import payload, untrusted
from lmrunner.backends.base import Backend
from lmrunner.config import Config
from lmrunner.errors import BackendError
from lmrunner.lifecycle import LmState, Outcome, heartbeat_problem, wallclock_outcome
from lmrunner.lmdisks import outputs_root
from lmrunner.state import LmRecord, Store

LOG = logging.getLogger("lmrunner.factory")


class Enforcer:
    """Stops one factory's LMs when they must stop."""

    def __init__(self, store: Store, clock: Callable[[], float], daemon_started: float) -> None:
        self.store = store
        self.clock = clock
        self.daemon_started = daemon_started

    def stop(
        self,
        config: Config,
        backend: Backend,
        record: LmRecord,
        reason: Outcome,
        *,
        grace: float | None = None,
    ) -> LmRecord:
        """Ask an LM to stop (``grace`` 0: kill it); it is killed when its grace period runs
        out. The reason is recorded first: it becomes the outcome, whatever the LM then does."""
        if record.handle is None:
            return record
        mt = config.machinetypes.get(record.machinetype)
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

    def enforce(
        self, config: Config, backends: Mapping[str, Backend], record: LmRecord, now: float
    ) -> tuple[LmRecord, bool]:
        """Apply the limits to one active LM; the record after, and whether it is being stopped
        now. A backend that cannot kill is the caller's to mark (it raises BackendError)."""
        backend = backends.get(record.backend)
        if record.handle is None or backend is None:
            return record, False
        if record.state is LmState.STOPPING:
            if record.stop_deadline is not None and now >= record.stop_deadline:
                backend.stop(record.uuid, record.handle, force=True)
            return record, False
        if record.state is not LmState.RUNNING:
            return record, False
        factory_end = config.factory.shutdown_time
        if factory_end is not None and factory_end < record.shutdown_time:
            try:
                payload.update_shutdowntime(record.directory, factory_end)
            except OSError as err:  # its folder vanished: the record still gets the time
                LOG.error("lm=%s: cannot lower its shutdowntime files: %s", record.name, err)
            record = self.store.update(record.uuid, shutdown_time=factory_end)
        reason = wallclock_outcome() if now >= record.shutdown_time else None
        mt = config.machinetypes.get(record.machinetype)
        if reason is None and mt is not None and mt.heartbeat_file and record.started:
            beat_file, directory = mt.heartbeat_file, outputs_root(record.directory) / "joboutputs"

            def beat_mtime() -> float | None:  # lstat of a regular file: a link is no heartbeat
                beat = untrusted.lstat_regular(directory, beat_file)
                return None if beat is None else beat.st_mtime

            reason = heartbeat_problem(
                now=now,
                started=record.started,
                daemon_started=self.daemon_started,
                fizzle_seconds=mt.fizzle_seconds,
                heartbeat_seconds=mt.heartbeat_seconds,
                beat_mtime=beat_mtime,
            )
        if reason is None:
            return record, False
        return self.stop(config, backend, record, reason), True
