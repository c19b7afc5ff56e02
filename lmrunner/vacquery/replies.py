"""What this factory answers to VacQuery: its slots, machinetypes and itself, in Vac's keys and
meanings (vac.md §8.3), from the store's facts. Pure functions of a :class:`Facts` snapshot."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lmrunner.config import Config
from lmrunner.lifecycle import LmState
from lmrunner.payload import lm_name
from lmrunner.state import LmRecord
from lmrunner.vacquery import protocol

#: Vac's machine_model names for lmrunner's backends.
MACHINE_MODEL = {"docker": "docker", "apptainer": "singularity", "vm": "vm-raw", "fake": "fake"}
#: Vac's state strings.
SHUT_DOWN, STARTING, RUNNING = "Shut down", "Starting", "Running"


@dataclass(frozen=True, slots=True)
class Facts:
    """One moment of this factory: its configuration, its active LMs and, per machinetype, its
    most recently created ended LM."""

    config: Config
    active: Sequence[LmRecord]
    last_finished: Mapping[str, LmRecord]
    now: float


def machine_state(record: LmRecord | None) -> str:
    if record is None or not record.active:
        return SHUT_DOWN
    if record.state in (LmState.CREATING, LmState.STARTING) or record.started is None:
        return STARTING
    return RUNNING


def _message(record: LmRecord | None) -> tuple[str | None, int | None]:
    """An ended LM's shutdown message and when (Vac: the file's ctime; here: its end)."""
    if record is None or record.outcome is None:
        return None, None
    finished = None if record.finished is None else int(record.finished)
    return record.outcome.message, finished


def _slots(facts: Facts) -> range:
    # Slots above a total lowered by a reload still hold running LMs until they end.
    return range(max([facts.config.factory.total_processors - 1,
                      *(r.slot for r in facts.active)]) + 1)  # fmt: skip


def machines(facts: Facts, cookie: str, client: str = "-") -> list[dict[str, Any]]:
    """One ``machine_status`` per slot, empty ones included (``num_machines`` of them)."""
    by_slot = {record.slot: record for record in facts.active}
    slots = _slots(facts)
    return [machine(facts, slot, by_slot.get(slot), len(slots), cookie, client) for slot in slots]


def ended_machine(facts: Facts, record: LmRecord, cookie: str, client: str = "-") -> dict[str, Any]:
    """The ``machine_status`` of an LM that ended (VacMon's, when it is finalised)."""
    return machine(facts, record.slot, record, len(_slots(facts)), cookie, client)


def machine(
    facts: Facts, slot: int, record: LmRecord | None, count: int, cookie: str, client: str = "-"
) -> dict[str, Any]:
    """The ``machine_status`` of one slot: empty, its active LM, or an LM that ended."""
    factory = facts.config.factory
    site = protocol.site_of(factory.space, factory.gocdb_sitename)
    reply = protocol.envelope("machine_status", factory.space, factory.hostname, cookie,
                              facts.now, site, client)  # fmt: skip
    reply["num_machines"] = count
    reply["machine"] = record.name if record else lm_name(factory.hostname, slot)
    reply["state"] = machine_state(record)
    if record is None:
        reply.update(machine_model=None, uuid=None, created_time=None, started_time=None,
                     heartbeat_time=None, num_cpus=0, num_processors=0, cpu_seconds=0,
                     cpu_percentage=0, hs06=0, machinetype=None, shutdown_message=None,
                     shutdown_time=None)  # fmt: skip
        return reply
    cpu = record.cpu_seconds or 0.0
    end = facts.now if record.active or record.finished is None else record.finished
    wall = 0.0 if record.started is None else max(end - record.started, 0.0)
    message, when = (None, None) if record.active else _message(record)
    reply.update(
        machine_model=MACHINE_MODEL.get(record.backend, record.backend),
        uuid=record.uuid,
        created_time=int(record.created),
        started_time=None if record.started is None else int(record.started),
        heartbeat_time=int(end),  # lmrunner watches its LMs: alive now, or until its end
        num_cpus=record.processors,
        num_processors=record.processors,
        cpu_seconds=cpu,
        cpu_percentage=100.0 * cpu / wall / record.processors if wall > 0 else 0.0,
        hs06=record.hs06,
        machinetype=record.machinetype,
        shutdown_message=message,
        shutdown_time=when,
    )
    mt = facts.config.machinetypes.get(record.machinetype)
    if mt is not None and mt.accounting_fqan:
        reply["fqan"] = mt.accounting_fqan
    return reply


def machinetypes(facts: Facts, cookie: str, client: str = "-") -> list[dict[str, Any]]:
    """One ``machinetype_status`` per configured machinetype (``num_machinetypes`` of them)."""
    config = facts.config
    factory = config.factory
    site = protocol.site_of(factory.space, factory.gocdb_sitename)
    replies = []
    for name, mt in config.machinetypes.items():
        mine = [r for r in facts.active if r.machinetype == name]
        before_fizzle = sum(
            1 for r in mine if r.started is None or facts.now < r.started + mt.fizzle_seconds
        )
        message, when = _message(facts.last_finished.get(name))
        last = facts.last_finished.get(name)
        reply = protocol.envelope("machinetype_status", factory.space, factory.hostname, cookie,
                                  facts.now, site, client)  # fmt: skip
        reply.update(
            num_machinetypes=len(config.machinetypes),
            machinetype=name,
            bytes_per_processor=factory.mb_per_processor * 1024 * 1024,
            running_hs06=sum(r.hs06 for r in mine),
            running_machines=len(mine),
            running_cpus=sum(r.processors for r in mine),
            running_processors=sum(r.processors for r in mine),
            num_before_fizzle=before_fizzle,
            shutdown_message=message,
            shutdown_time=when,
            shutdown_machine=None if last is None or message is None else last.name,
            max_wallclock_seconds=mt.max_wallclock_seconds,
            max_processors=mt.max_processors,
        )
        if mt.accounting_fqan:
            reply["fqan"] = mt.accounting_fqan
        replies.append(reply)
    return replies


def factory_status(facts: Facts, cookie: str, client: str = "-") -> dict[str, Any]:
    """The one ``factory_status``: counts, capacity, disks, memory and load of this host."""
    config = facts.config
    factory = config.factory
    site = protocol.site_of(factory.space, factory.gocdb_sitename)
    running = list(facts.active)
    processors = sum(r.processors for r in running)
    hs06 = sum(r.hs06 for r in running)
    total = factory.total_processors
    max_hs06 = total * (factory.hs06_per_processor or 1.0)
    state = _statvfs(factory.state_dir)
    tmp = _statvfs("/tmp")
    memory = _meminfo()
    reply = protocol.envelope("factory_status", factory.space, factory.hostname, cookie,
                              facts.now, site, client)  # fmt: skip
    reply.update(
        running_cpus=processors,
        running_processors=processors,
        running_machines=len(running),
        running_hs06=hs06,
        max_cpus=total,
        max_processors=total,
        max_machines=total,
        max_hs06=max_hs06,
        total_cpus=total,
        total_machines=total,
        total_hs06=max_hs06,
        root_disk_avail_kb=tmp[0],
        root_disk_avail_inodes=tmp[1],
        vac_disk_avail_kb=state[0],
        daemon_disk_avail_kb=state[0],
        vac_disk_avail_inodes=state[1],
        daemon_disk_avail_inodes=state[1],
        load_average=round(os.getloadavg()[2], 2),
        kernel_version=os.uname().release,
        os_issue=_os_issue(),
        boot_time=int(time.time() - _uptime()),
        factory_heartbeat_time=int(facts.now),
        responder_heartbeat_time=int(time.time()),
        mjf_heartbeat_time=0,
        metadata_heartbeat_time=0,
        swap_used_kb=memory.get("SwapTotal", 0) - memory.get("SwapFree", 0),
        swap_free_kb=memory.get("SwapFree", 0),
        mem_used_kb=memory.get("MemTotal", 0) - memory.get("MemFree", 0),
        mem_total_kb=memory.get("MemTotal", 0),
    )
    return reply


def _statvfs(path: object) -> tuple[int, int]:
    """Free kB and free inodes of a filesystem (0, 0 when it cannot be looked at)."""
    try:
        info = os.statvfs(str(path))
    except OSError:
        return 0, 0
    return info.f_bavail * info.f_frsize // 1024, info.f_favail


def _meminfo() -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as handle:  # noqa: PTH123 - a kernel file, read once
            for line in handle:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if fields and fields[0].isdigit():
                    values[key] = int(fields[0])
    except OSError:
        pass
    return values


def _uptime() -> float:
    try:
        with open("/proc/uptime") as handle:  # noqa: PTH123 - a kernel file, read once
            return float(handle.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def _os_issue() -> str:
    for path in ("/etc/issue.vac", "/etc/os-release"):
        try:
            with open(path) as handle:  # noqa: PTH123
                text = handle.read(4096)
        except OSError:
            continue
        if path.endswith("os-release"):
            for line in text.splitlines():
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
        elif text.strip():
            return text.splitlines()[0].strip()
    return os.uname().release
