"""Issue 6's proofs, the same for every backend and cgroup version: a factory with the host's
cgroup controller runs vcbusybox payloads, and the LM's cgroup must account and enforce.

Used by ``test_accounting.py`` (host: cgroup v1) and ``cgroup_v2/test_accounting_v2.py`` (guest).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmrunner.accounting import Flag
from lmrunner.cgroups import CgroupRef
from lmrunner.config import Config
from lmrunner.factory import Factory
from lmrunner.lifecycle import OutcomeSource
from lmrunner.lmcgroups import host_cgroups
from lmrunner.loader import load_config
from lmrunner.process import identify, stat_fields
from lmrunner.state import LmRecord
from tests.integration.conftest import TIMESCALE, Factories, drive

REPO = Path(__file__).resolve().parents[2]
VCBUSYBOX = Path(os.environ.get("VCBUSYBOX_OUT", REPO / "build" / "vcbusybox"))
CLK_TCK = os.sysconf("SC_CLK_TCK")

#: Burns CPU in a child for 8 s (so the engine's own start-up, tens of ms, stays well under 1 %);
#: the payload's shell then reports its own and its reaped children's CPU time from /proc
#: (fields utime, stime, cutime, cstime): the known amount.
BURN = """#!/bin/sh
( while :; do :; done ) & loop=$!
sleep 8; kill $loop; wait $loop
cat /proc/$$/stat > "$JOBOUTPUTS/burn.stat"
echo "200 burnt" > "$JOBOUTPUTS/shutdown_message"
"""
#: The VM's burn says when it begins (the boot takes 1-10 s), so the host samples inside it.
VM_BURN = """#!/bin/sh
touch "$JOBOUTPUTS/burning"
( while :; do :; done ) & loop=$!
sleep 12; kill $loop; wait $loop
echo "200 burnt" > "$JOBOUTPUTS/shutdown_message"
"""
TWO_LOOPS = "#!/bin/sh\n(while :; do :; done) & (while :; do :; done) & sleep 600\n"
#: The shell doubles a string until the kernel kills it.
HOG = '#!/bin/sh\nx=0123456789\nwhile :; do x="$x$x"; done\n'
#: A daemonised grandchild in its own session, which must not survive the LM.
ESCAPER = "#!/bin/sh\nsetsid sh -c 'sleep 600' &\nsleep 600\n"


def docker_machinetype(user_data: Path) -> dict[str, Any]:
    return {"backend": "docker", "image": "docker://vcbusybox:latest", "user_data": str(user_data)}


def apptainer_machinetype(user_data: Path) -> dict[str, Any]:
    image = VCBUSYBOX / "apptainer" / "vcbusybox"
    return {"backend": "apptainer", "image": str(image), "user_data": str(user_data)}


def vm_machinetype(user_data: Path) -> dict[str, Any]:
    return {
        "backend": "vm",
        "image": str(VCBUSYBOX / "vm" / "vmlinuz"),
        "vm_initrd": str(VCBUSYBOX / "vm" / "initramfs.cpio.gz"),
        "vm_kernel_append": "console=ttyS0 panic=-1",
        "user_data": str(user_data),
    }


MACHINETYPES: dict[str, Callable[[Path], dict[str, Any]]] = {
    "docker": docker_machinetype,
    "apptainer": apptainer_machinetype,
    "vm": vm_machinetype,
}
#: Processes an ESCAPER LM shows in its cgroup: a VM's payload is inside QEMU, the one process.
ESCAPER_PROCESSES = {"vm": 1}


@dataclass
class Rig:
    """Factories for one backend on a temporary state directory; removes what they made."""

    backend: str
    folder: Path
    factories: Factories

    def config(self, script: str, *, mb_per_processor: int = 512) -> Config:
        user_data = self.folder / "user_data"
        user_data.write_text(script)
        user_data.chmod(0o755)
        data = {
            "factory": {
                "space": "accounting.example.com",
                "hostname": "accounting.example.com",
                "state_dir": str(self.folder / "state"),
                "total_processors": 1,
                "mb_per_processor": mb_per_processor,
            },
            "machinetypes": {
                "acct": {
                    **MACHINETYPES[self.backend](user_data),
                    "target_share": 1,
                    "fizzle_seconds": 0,
                    "stop_grace_seconds": 2,
                    "accounting_fqan": "/lhcb/Role=pilot",
                }
            },
        }
        path = self.folder / "lmrunner.yaml"
        path.write_text(yaml.safe_dump(data))
        return load_config(path, cpus=1)

    def factory(self, config: Config) -> Factory:
        assert host_cgroups(config.factory) is not None, "this host must give lmrunner cgroups"
        return self.factories.make(config)

    def close(self) -> None:
        self.factories.close()


@contextlib.contextmanager
def rig(backend: str) -> Iterator[Rig]:
    """A rig on a fresh 0755 folder (LMs run by sc_user reach their files; pytest's tmp root is
    0700), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="lmrunner-accounting-"))
    root.chmod(0o755)
    made = Rig(backend, root, Factories(backend))
    try:
        yield made
    finally:
        made.close()
        shutil.rmtree(root, ignore_errors=True)


def one_lm(factory: Factory) -> LmRecord:
    """Start the factory's first LM and return its record once it runs."""
    drive(factory, lambda: bool(factory.store.active()))
    factory.store.set_meta("draining", "1")  # exactly one LM per scenario
    return factory.store.active()[0]


def until_ended(factory: Factory, uuid: str, timeout: float = 90.0) -> LmRecord:
    def ended() -> bool:
        record = factory.store.get(uuid)
        return record is not None and not record.active

    drive(factory, ended, timeout)
    record = factory.store.get(uuid)
    assert record is not None
    return record


def cgroup_dirs(ref: CgroupRef) -> list[Path]:
    """The LM's cgroup directories, and any an engine made at the same path elsewhere."""
    root = Path("/sys/fs/cgroup")
    return [
        *ref.unique_paths(),
        *root.glob(f"*/lmrunner/{ref.name}"),
        *root.glob(f"lmrunner/{ref.name}"),
    ]


def cpu_seconds(stat_text: str, *, children: bool = False) -> float:
    """CPU seconds from a ``/proc/<pid>/stat`` text: utime + stime, and with ``children`` the
    reaped children's cutime + cstime too."""
    values = stat_fields(stat_text)[11 : 15 if children else 13]
    return sum(int(v) for v in values) / CLK_TCK


# --- the scenarios: each returns the figures it measured ----------------------------------------


def burn_is_accounted(r: Rig) -> dict[str, float]:
    """A payload that burns a known amount of CPU is accounted within 2 %."""
    factory = r.factory(r.config(BURN))
    lm = one_lm(factory)
    done = until_ended(factory, lm.uuid)
    assert done.outcome is not None and done.outcome.code == 200, done.outcome
    known = cpu_seconds((done.directory / "joboutputs" / "burn.stat").read_text(), children=True)
    rows = factory.store.accounting()
    assert len(rows) == 1
    row = rows[0]
    assert row.cpu_seconds is not None and Flag.UNMEASURED not in row.flags
    error = abs(row.cpu_seconds - known) / known
    print(f"{r.backend}: payload's own CPU {known:.3f} s, accounted {row.cpu_seconds:.3f} s, "
          f"error {100 * error:.2f} %")  # fmt: skip
    assert known > 2.0, known  # the loop really ran (the host is shared: not all 8 s)
    assert row.cpu_seconds >= known * 0.98  # nothing the payload used goes unaccounted
    if TIMESCALE == 1:
        # The LM's cgroup also counts its engine's start-up: tens of ms on a host, but whole
        # seconds in the TCG test guest, where cpu_matches_rusage proves the counter instead.
        assert error <= 0.02
    assert row.vo == "lhcb" and row.fqan == "/lhcb/Role=pilot"
    assert done.started is not None and done.finished is not None
    assert abs(row.wall_seconds - (done.finished - done.started)) < 1e-6
    assert row.wall_seconds >= 7.5  # "started" is stamped once the engine said so
    assert row.memory_peak_bytes is not None and row.memory_peak_bytes > 0
    return {"known_cpu_s": known, "accounted_cpu_s": row.cpu_seconds, "error": error}


def engine_cpu_is_accounted(r: Rig) -> dict[str, float]:
    """A VM's payload burns CPU inside the guest, where its own figures are guest time; what the
    host spends on it is QEMU's CPU (all threads: /proc/PID/stat utime + stime). The LM's cgroup
    must account that within 2 %, sampled together while the guest burns, and the record must
    hold at least as much."""
    factory = r.factory(r.config(VM_BURN))
    lm = one_lm(factory)
    assert lm.handle is not None and factory.cgroups is not None
    qemu = identify(int(lm.handle.data["pid"]))
    assert qemu is not None and qemu.start_ticks == lm.handle.data["start_ticks"]
    ref = CgroupRef.from_json(lm.cgroup or "")
    marker = lm.directory / "joboutputs" / "burning"
    deadline = time.monotonic() + 120.0 * TIMESCALE
    while not marker.exists():  # booted (however long TCG or KVM take), and burning
        assert time.monotonic() < deadline, "the guest never started burning"
        time.sleep(0.1)
    time.sleep(4.0)  # well inside the guest's 12 s burn
    known = cpu_seconds(Path(f"/proc/{qemu.pid}/stat").read_text())  # the whole thread group
    used = factory.cgroups.usage(ref).cpu_seconds
    assert identify(qemu.pid) == qemu  # the same QEMU, still running
    error = abs(used - known) / known
    print(f"{r.backend}: QEMU's own CPU {known:.3f} s, cgroup {used:.3f} s, "
          f"error {100 * error:.2f} %")  # fmt: skip
    assert known > 2.0, known
    assert error <= 0.02
    done = until_ended(factory, lm.uuid, timeout=120.0 * TIMESCALE)
    assert done.outcome is not None and done.outcome.code == 200, done.outcome
    row = factory.store.accounting()[0]
    assert row.cpu_seconds is not None and row.cpu_seconds >= known
    assert Flag.UNMEASURED not in row.flags
    return {"known_cpu_s": known, "accounted_cpu_s": used, "error": error}


def accuracy(backend: str) -> Callable[[Rig], dict[str, float]]:
    """The CPU accuracy scenario for ``backend``: a VM's payload runs on guest time, so for VMs
    it is the engine's CPU that must be accounted."""
    return engine_cpu_is_accounted if backend == "vm" else burn_is_accounted


#: Backends whose payload's processes are the cgroup's own: the two-loops and hog scenarios apply.
#: A VM's are inside its guest: 1 vCPU cannot run 2 loops at once, and the guest's own kernel
#: kills a hog before the cgroup's limit is reached.
PAYLOAD_IN_CGROUP = ("docker", "apptainer")


def two_loops_are_held_to_one_cpu(r: Rig) -> dict[str, float]:
    """Two busy loops in a 1-processor LM use at most 1.05 CPUs over 10 s."""
    factory = r.factory(r.config(TWO_LOOPS))
    lm = one_lm(factory)
    ref = CgroupRef.from_json(lm.cgroup or "")
    assert factory.cgroups is not None
    time.sleep(2.0)  # both loops running
    first, t0 = factory.cgroups.usage(ref).cpu_seconds, time.monotonic()
    time.sleep(10.0)
    last, t1 = factory.cgroups.usage(ref).cpu_seconds, time.monotonic()
    cpus = (last - first) / (t1 - t0)
    print(f"{r.backend}: two busy loops in a 1-processor LM used {cpus:.3f} CPUs over 10 s")
    assert cpus <= 1.05
    assert cpus >= 0.5  # they did run (the host has 2 processors, shared)
    factory.store.add_request(lm.uuid, "kill")
    until_ended(factory, lm.uuid)
    return {"cpus": cpus}


def hog_is_oom_killed(r: Rig) -> dict[str, float]:
    """A memory hog is killed at its limit and the outcome says oom."""
    factory = r.factory(r.config(HOG, mb_per_processor=64))
    lm = one_lm(factory)
    done = until_ended(factory, lm.uuid)
    assert done.outcome is not None
    assert done.outcome.source is OutcomeSource.OOM, done.outcome
    assert "OOM" in done.outcome.text
    row = factory.store.accounting()[0]
    assert Flag.OOM in row.flags
    assert row.memory_peak_bytes is not None
    limit = 64 * 1024 * 1024
    print(f"{r.backend}: hog peak {row.memory_peak_bytes} bytes of a {limit} byte limit, "
          f"{row.oom_kills} OOM kills")  # fmt: skip
    assert limit * 0.5 <= row.memory_peak_bytes <= limit + 4096
    return {"peak_bytes": row.memory_peak_bytes, "limit_bytes": limit}


def kill_leaves_nothing(r: Rig) -> dict[str, float]:
    """Killing an LM leaves no process behind, and its cgroup goes with it."""
    factory = r.factory(r.config(ESCAPER))
    lm = one_lm(factory)
    ref = CgroupRef.from_json(lm.cgroup or "")
    assert factory.cgroups is not None
    expected = ESCAPER_PROCESSES.get(r.backend, 3)
    deadline = time.monotonic() + 30
    while len(factory.cgroups.pids(ref)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)  # the payload and its escaped grandchild are up
    pids = factory.cgroups.pids(ref)
    assert len(pids) >= expected, pids
    factory.store.add_request(lm.uuid, "kill")
    done = until_ended(factory, lm.uuid)
    assert done.outcome is not None and done.outcome.source is OutcomeSource.OPERATOR
    left = [pid for pid in pids if identify(pid) is not None]  # zombies count as gone
    assert left == [], f"processes left behind: {left}"
    assert all(not path.exists() for path in cgroup_dirs(ref)), cgroup_dirs(ref)
    assert done.cgroup is None
    return {"processes_killed": float(len(pids))}


def cpu_matches_rusage(controller: Any, name: str) -> dict[str, float]:
    """The cgroup's CPU counter against the kernel's own per-process figure (wait4 rusage of a
    process tree that burns for 3 s), for the driver alone: no engine start-up in either."""
    from lmrunner.cgroups.base import enter

    ref = controller.create(name)
    controller.set_limits(ref, cpus=1, memory_bytes=64 * 1024 * 1024, swap_bytes=0, pids=64)
    files = controller.procs_files(ref)
    script = "( while :; do :; done ) & p=$!; sleep 3; kill $p; wait $p"
    proc = subprocess.Popen(["sh", "-c", script], preexec_fn=lambda: enter(files))
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, for its rusage
    own = rusage.ru_utime + rusage.ru_stime
    used = controller.usage(ref).cpu_seconds
    error = abs(used - own) / own
    print(f"cgroup v{controller.version}: rusage {own:.3f} s, cgroup {used:.3f} s, "
          f"error {100 * error:.2f} %")  # fmt: skip
    assert own > 1.0, own
    assert error <= 0.02
    return {"rusage_cpu_s": own, "cgroup_cpu_s": used, "error": error}
