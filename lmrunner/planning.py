"""What the planner (:mod:`lmrunner.slots`, pure) is given on this host: the machinetypes whose
engine works, ``lmrunner drain`` on top of the configuration, the running LMs and each
machinetype's history (Vac's backoff input)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

from lmrunner import slots
from lmrunner.config import Config
from lmrunner.state import LmRecord, Store


def histories(config: Config, store: Store) -> dict[str, slots.TypeHistory]:
    """Vac's backoff input: the end of the most recently created finished LM, if an abort."""
    out: dict[str, slots.TypeHistory] = {}
    for name, record in store.last_finished(config.machinetypes).items():
        aborted = record.outcome is not None and record.outcome.abort
        out[name] = slots.TypeHistory(last_abort=record.finished if aborted else None)
    return out


def inputs(
    config: Config,
    store: Store,
    active: list[LmRecord],
    engines: Collection[str] | None,
    waiting: Collection[str] = (),
) -> tuple[Config, list[slots.RunningLm], dict[str, slots.TypeHistory]]:
    """The configuration as the planner must see it (only machinetypes of ``engines``, all
    when None, and none of ``waiting`` (their images are not downloaded yet); draining when
    ``lmrunner drain`` said so), the running LMs and the histories."""
    if engines is not None or waiting:
        usable = {
            n: mt
            for n, mt in config.machinetypes.items()
            if (engines is None or mt.backend.value in engines) and n not in waiting
        }
        if len(usable) < len(config.machinetypes):  # engines missing or down, images not here
            config = replace(config, machinetypes=usable)
    if store.meta("draining") == "1":
        config = replace(config, factory=replace(config.factory, draining=True))
    running = [
        slots.RunningLm(r.machinetype, r.processors, r.hs06, r.shutdown_time, r.created, r.started)
        for r in active
    ]
    return config, running, histories(config, store)
