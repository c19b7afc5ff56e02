"""What the planner (:mod:`lmrunner.slots`, pure) is given on this host: the machinetypes whose
engine works, ``lmrunner drain`` on top of the configuration, the running LMs and each
machinetype's history (Vac's backoff input), with what the other factories of the space run
and their aborts when there is a view of the space (:mod:`lmrunner.vacquery.space`)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import replace

from lmrunner import slots
from lmrunner.config import Config
from lmrunner.state import LmRecord, Store
from lmrunner.vacquery.space import SpaceView


def histories(
    config: Config, store: Store, space: SpaceView | None = None
) -> dict[str, slots.TypeHistory]:
    """Vac's backoff input: the end of the most recently created finished LM, if an abort; with
    a view of the space, the latest abort on any factory and what the others run (§3.4)."""
    return histories_from(config, store.last_finished(config.machinetypes), space)


def histories_from(
    config: Config, last_finished: Mapping[str, LmRecord], space: SpaceView | None = None
) -> dict[str, slots.TypeHistory]:
    """:func:`histories` from each machinetype's most recently created ended LM, read
    already."""
    out: dict[str, slots.TypeHistory] = {}
    for name, record in last_finished.items():
        aborted = record.outcome is not None and record.outcome.abort
        out[name] = slots.TypeHistory(last_abort=record.finished if aborted else None)
    if space is None:
        return out
    for name, there in space.types.items():
        if name not in config.machinetypes:
            continue
        here = out.get(name, slots.TypeHistory(last_abort=None))
        aborts = [t for t in (here.last_abort, there.last_abort) if t is not None]
        out[name] = slots.TypeHistory(
            last_abort=max(aborts) if aborts else None,
            elsewhere_hs06=there.running_hs06,
            elsewhere_before_fizzle=there.num_before_fizzle,
        )
    return out


def inputs(
    config: Config,
    store: Store,
    active: list[LmRecord],
    engines: Collection[str] | None,
    waiting: Collection[str] = (),
    space: SpaceView | None = None,
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
    return config, running, histories(config, store, space)
