"""A configuration reloaded (SIGHUP), applied between two passes: which backends are made anew
and what of the running configuration a reload may not change."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import fields, replace

from lmrunner.backends.base import Backend
from lmrunner.config import Config
from lmrunner.errors import MachineNotFound
from lmrunner.guard import guarded
from lmrunner.state import LmRecord

LOG = logging.getLogger("lmrunner.factory")


def pinned(old: Config, new: Config) -> Config:
    """``new``, with what changes only at a restart kept from ``old``: the state directory, the
    cgroup parent (the store and the running LMs' cgroups live there) and the disk method (the
    running LMs' filesystems were made by it)."""
    names = ("state_dir", "cgroup_parent", "disk_method")
    keep = {name: getattr(old.factory, name) for name in names}
    if all(getattr(new.factory, name) == value for name, value in keep.items()):
        return new
    LOG.warning("factory.%s change at a restart only", ", factory.".join(names))
    return replace(new, factory=replace(new.factory, **keep))


def remade(
    old: Config,
    new: Config,
    backends: Mapping[str, Backend],
    active: list[LmRecord],
    make: Callable[[str], Backend | None],
    notify: Callable[[str], None],
) -> dict[str, Backend]:
    """The backends for ``new``: those it needs that are missing, or all of them when the
    factory settings changed, made anew with ``make(name)``, watched (``notify``) and reattached
    to their running LMs (each of which ``notify`` is told about, to be looked at). Running LMs
    of a machinetype that is gone run on, and are finalised as usual."""
    needed = {mt.backend.value for mt in new.machinetypes.values()}
    needed |= {record.backend for record in active}
    remake = needed if new.factory != old.factory else needed - set(backends)
    made: dict[str, Backend] = {}
    try:  # all made before any is replaced: a make() that fails leaves the running ones as is
        for name in sorted(remake):
            fresh = make(name)
            if fresh is not None:  # None: not in this lmrunner (reported at the daemon's start)
                made[name] = fresh
    except BaseException:
        for fresh in made.values():
            fresh.close()
        raise
    out = dict(backends)
    for name, fresh in made.items():
        if name in out:
            out[name].close()
        out[name] = fresh
        fresh.watch(notify)
        for record in active:
            if record.backend == name and record.handle is not None:
                with guarded(record.name), contextlib.suppress(MachineNotFound):
                    fresh.recover(record.uuid, record.handle)
                notify(record.uuid)
        LOG.info("backend=%s: made anew for the new configuration", name)
    return out


def changes(old: Config, new: Config) -> list[str]:
    """What a reload changes in the machinetypes (added, removed, changed: which options), one
    line each, for the log: a pipe refreshed by the daemon says what it brought."""
    lines = []
    for name in sorted(set(new.machinetypes) - set(old.machinetypes)):
        lines.append(f"machinetype {name} added")
    for name in sorted(set(old.machinetypes) - set(new.machinetypes)):
        lines.append(f"machinetype {name} removed (its running LMs go on)")
    for name in sorted(set(old.machinetypes) & set(new.machinetypes)):
        before, after = old.machinetypes[name], new.machinetypes[name]
        if before != after:
            changed = [
                f.name for f in fields(after) if getattr(before, f.name) != getattr(after, f.name)
            ]
            lines.append(f"machinetype {name} changed: {', '.join(changed)}")
    return lines
