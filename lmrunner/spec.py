"""From a start decision to what the store and the backend get: the LM's identity, directory,
limits, owner and image resolved once, so its record, its cgroup, its MJF files and its backend
all see the same values."""

from __future__ import annotations

import os
import pwd
import uuid as uuid_mod
from dataclasses import dataclass
from pathlib import Path

from lmrunner import payload
from lmrunner.backends.base import (
    LABEL_FACTORY,
    LABEL_NAME,
    LABEL_UUID,
    Backend,
    MachineSpec,
)
from lmrunner.config import Config, MachinetypeConfig, resolve_local
from lmrunner.errors import LmrunnerError
from lmrunner.slots import StartDecision
from lmrunner.state import LmRecord


@dataclass(frozen=True, slots=True)
class Planned:
    """A start decision made concrete: the LM's record (to insert) and its identity."""

    record: LmRecord
    identity: payload.LmIdentity
    mt: MachinetypeConfig


def plan(
    config: Config, decision: StartDecision, backend: Backend, slot: int, created: float
) -> Planned:
    """The record of a new LM (state CREATING): nothing is made yet."""
    factory = config.factory
    mt = config.machinetypes[decision.machinetype]
    name = payload.lm_name(factory.hostname, slot)
    identity = payload.LmIdentity(name=name, uuid=str(uuid_mod.uuid4()), machinetype=mt.name)
    # Vac's <created>_<machinetype>_<name>, plus the uuid: names are reused within a second.
    directory = (
        factory.state_dir / "machines" / f"{int(created)}_{mt.name}_{name}_{identity.uuid[:8]}"
    )
    record = LmRecord(
        uuid=identity.uuid,
        name=name,
        machinetype=mt.name,
        backend=backend.name,
        slot=slot,
        processors=decision.processors,
        limits=payload.limits_for(config, mt, decision.processors),
        # unset counts as 1 HS06 per processor for the shares; a configured 0 stays 0
        hs06=(1.0 if factory.hs06_per_processor is None else factory.hs06_per_processor)
        * decision.processors,
        shutdown_time=decision.shutdown_time,
        directory=directory,
        created=created,
    )
    return Planned(record, identity, mt)


def owner(config: Config, backend: Backend) -> tuple[int, int]:
    """The uid and gid the LM runs as (the factory's own, or ``sc_user``'s)."""
    if not backend.runs_as_sc_user:
        return (os.getuid(), os.getgid())
    try:
        account = pwd.getpwnam(config.factory.sc_user)
    except KeyError as err:
        raise LmrunnerError(f"factory.sc_user: no account {config.factory.sc_user!r}") from err
    return (account.pw_uid, account.pw_gid)


def build(
    config: Config,
    planned: Planned,
    backend: Backend,
    *,
    factory_id: str,
    owner: tuple[int, int],
    downloaded: Path | None = None,
    disk: Path | None = None,
) -> MachineSpec:
    """Make the LM's directory (user_data, MJF, joboutputs) and return its spec (its cgroup is
    made once the backend has validated it). ``downloaded``: the local copy of a remote image
    (:mod:`lmrunner.images`), which the engine gets instead of the URL. ``disk``: the LM's own
    filesystem, mounted (:mod:`lmrunner.lmdisks`)."""
    record, mt = planned.record, planned.mt
    prepared = payload.prepare(
        config,
        mt,
        planned.identity,
        placement=backend.placement,
        limits=record.limits,
        created=int(record.created),
        shutdown_time=record.shutdown_time,
        lm_dir=record.directory,
        owner=owner,
        disk=disk,
    )
    files = config.files_dir(mt.name)
    return MachineSpec(
        uuid=record.uuid,
        name=record.name,
        machinetype=mt.name,
        image=str(downloaded) if downloaded is not None else image(mt.image, files),
        command=(mt.container_command,),
        limits=record.limits,
        mounts=prepared.mounts,
        env=prepared.env,
        labels={LABEL_FACTORY: factory_id, LABEL_NAME: record.name, LABEL_UUID: record.uuid},
        directory=prepared.directory,
        owner=owner,
        stop_grace_seconds=mt.stop_grace_seconds,
        options=backend.options_type.from_machinetype(mt, files),
        disk=disk,
    )


def image(reference: str, files: Path) -> str:
    """A machinetype's image: a relative file name resolved in its files folder (engine
    references such as docker://, oras:// or a Docker image name are passed through)."""
    if "://" in reference:
        return reference
    candidate = resolve_local(reference, files)
    return str(candidate) if candidate.exists() else reference
