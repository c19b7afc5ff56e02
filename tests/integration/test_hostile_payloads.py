"""Hostile payloads on every real backend: what an LM plants in its joboutputs never makes the
daemon follow it out of the LM, hang, flood, or stop.

A payload is root in its LM and owns ``$JOBOUTPUTS``, a host folder (``<lm dir>/joboutputs``,
bind-mounted into Docker and Apptainer LMs, 9p-shared with VMs, where the guest's links and
FIFOs become real ones on the host). For each backend one real ``lmrunner daemon`` runs, with
two processors, one LM of each hostile machinetype and a harmless machinetype that keeps
starting LMs:

- ``hblink``: ``shutdown_message`` -> a host path outside the LM that does not exist (a),
  ``leak`` -> a secret host file (b), the heartbeat file -> a host file the test keeps fresh
  (e), plus a FIFO, a link to /dev/zero and a 1 GiB sparse file, for ``lmrunner logs``; then it
  sleeps until the daemon stops it for the missing heartbeat.
- ``hbfifo``: ``shutdown_message`` -> the secret host file (a); the heartbeat file a FIFO whose
  times the payload keeps fresh (e); stopped the same way.
- ``fifo`` (c), ``zero`` (d: -> /dev/zero), ``big`` (d: 1 GiB of zeros; 64 MiB in the VM, whose
  9p writes are slow under TCG): the ``shutdown_message``, then the payload exits.

The secret reads as a valid shutdown_message ("300 secret <token>"), so a daemon that followed
the link would make it the LM's outcome. Hostile LMs end with an abort (heartbeat stop, or an
exit before ``fizzle_seconds``), so their machinetype backs off and each runs once. While a
heartbeat LM runs and right after it ended the test runs ``lmrunner logs`` on it; the factory
is drained meanwhile, so that its name (reused slot by slot) still means that LM.

The daemon is shared by all the checks of one backend (module-scoped fixture, one test per
check); the checks read what the fixture observed.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import uuid as uuid_mod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmrunner.config import FactoryConfig
from lmrunner.layout import outputs_root
from lmrunner.lifecycle import LmState, OutcomeSource
from lmrunner.lmcgroups import host_cgroups
from lmrunner.state import LmRecord, Store
from tests.integration import daemons
from tests.integration.conftest import TIMESCALE, remove_lms, start_daemon

pytestmark = pytest.mark.slow

BACKENDS = [
    pytest.param("docker", marks=pytest.mark.docker),
    pytest.param("apptainer", marks=pytest.mark.apptainer),
    pytest.param("vm", marks=pytest.mark.qemu),
]
HEARTBEAT_TYPES = ("hblink", "hbfifo")
EXIT_TYPES = ("fifo", "zero", "big")
HOSTILE = HEARTBEAT_TYPES + EXIT_TYPES
HEARTBEAT = "heartbeat"
#: A payload whose mkfifo failed leaves this file: QEMU's 9p server refuses a guest's mknod
#: (ENXIO), so no VM can plant a FIFO on the host.
REFUSED = "mkfifo-refused"
FIFO_REFUSED = "300 mkfifo refused"
#: An LM's end must be recorded within this many seconds of its payload's last act.
END_SECONDS = 15.0
#: The whole run of one backend, and the longest time without any LM ending, before giving up.
RUN_SECONDS = 240.0 * TIMESCALE
STALL_SECONDS = 75.0 * TIMESCALE


@dataclass(frozen=True)
class Engine:
    """How one backend's LMs are made."""

    machinetype: dict[str, Any]  # backend, image and the like
    factory: dict[str, Any]
    fizzle_seconds: int  # of the heartbeat machinetypes: the LM has planted everything by then
    big_bytes: int
    harmless_seconds: int  # how long a harmless LM lives (VMs: fewer boots)
    stop_grace_seconds: int


@dataclass
class Observed:
    """What one backend's run showed; the tests judge it."""

    backend: str
    config: Path
    secret: Path
    secret_before: tuple[bytes, int]
    secret_after: tuple[bytes, int] | None = None
    dangling: Path = Path()
    token: str = ""
    outside_after: list[str] = field(default_factory=list)
    snapshot: daemons.Snapshot | None = None
    ended_seen: dict[str, float] = field(default_factory=dict)  # uuid -> when the test saw it
    planted_at: dict[str, float] = field(default_factory=dict)  # machinetype -> mtime
    refused: set[str] = field(default_factory=set)  # machinetypes whose mkfifo failed
    logs_running: dict[str, daemons.Cli] = field(default_factory=dict)
    logs_ended: dict[str, daemons.Cli] = field(default_factory=dict)
    peak_rss: int = 0
    rss_growth: list[str] = field(default_factory=list)  # when VmHWM grew, and what happened
    died: str | None = None  # the daemon ended before the test stopped it
    exit_code: int | None = None  # at the test's SIGTERM
    log_text: str = ""
    gave_up: str | None = None
    cleanup_problems: list[str] = field(default_factory=list)

    def lm(self, machinetype: str) -> LmRecord:
        """The first LM of ``machinetype``, which ran its payload and ended."""
        assert self.snapshot is not None, f"no store: {self.gave_up}\n{self.log_tail()}"
        lm = self.snapshot.first_of(machinetype)
        assert lm is not None, f"no {machinetype} LM started ({self.gave_up})\n{self.log_tail()}"
        assert machinetype in self.planted_at, f"{lm.name} never planted its files\n{lm}"
        assert not lm.active, f"{lm.name} ({machinetype}) never ended: {self.gave_up}\n{lm}"
        assert lm.outcome is not None, lm
        return lm

    def log_tail(self) -> str:
        return self.log_text[-4000:]

    def rss_ok(self) -> str | None:
        """Why the daemon's peak RSS is too high (when VmHWM grew), None when it is not."""
        if self.peak_rss < daemons.RSS_LIMIT_BYTES:
            return None
        return f"daemon VmHWM {self.peak_rss / 2**20:.0f} MiB; it grew: " + "; ".join(
            self.rss_growth
        )


def payloads(
    dangling: Path, secret: Path, beat: Path, big_bytes: int, harmless: int
) -> dict[str, str]:
    q = shlex.quote
    head = '#!/bin/sh\no="$JOBOUTPUTS"\n'
    planted = 'echo planted > "$o/planted"\n'
    return {
        "hblink": head
        + f'ln -s {q(str(dangling))} "$o/shutdown_message"\n'
        + f'ln -s {q(str(secret))} "$o/leak"\n'
        + f'ln -s {q(str(beat))} "$o/{HEARTBEAT}"\n'
        + 'mkfifo "$o/pipe"\nln -s /dev/zero "$o/zero"\ntruncate -s 1G "$o/huge"\n'
        + planted
        + "sleep 600 & wait $!\n",
        "hbfifo": head
        + f'ln -s {q(str(secret))} "$o/shutdown_message"\n'
        + f'mkfifo "$o/{HEARTBEAT}" || echo refused > "$o/{REFUSED}"\n'
        + planted
        # busybox touch sets a FIFO's times without opening it: fresh, yet never a heartbeat
        # (-c: where mkfifo was refused, no regular file takes its place).
        + f'while :; do touch -c "$o/{HEARTBEAT}"; sleep 1; done & wait $!\n',
        "fifo": head
        + 'if mkfifo "$o/shutdown_message"; then\n'
        # The image's /init writes its own message into an empty shutdown_message once the
        # payload ended; this reader lets that write finish (the FIFO stays, for lmrunner).
        + '  cat "$o/shutdown_message" > /dev/null &\n'
        + "else\n"
        + f'  echo refused > "$o/{REFUSED}"\n'
        + f'  echo "{FIFO_REFUSED}" > "$o/shutdown_message"  # an abort: it runs once\n'
        + "fi\n"
        + planted,
        "zero": head + 'ln -s /dev/zero "$o/shutdown_message"\n' + planted,
        "big": head + f'head -c {big_bytes} /dev/zero > "$o/shutdown_message"\n' + planted,
        "harmless": head
        + f"sleep {harmless}\n"
        + 'echo "200 Intended work completed ok" > "$o/shutdown_message"\n',
    }


def engine_for(request: pytest.FixtureRequest, backend: str, cgroup_parent: str) -> Engine:
    """The backend's settings, after its engine fixtures (which skip when it is missing)."""
    if backend == "docker":
        request.getfixturevalue("docker_client")
        request.getfixturevalue("vcbusybox")
        return Engine(
            {"backend": "docker", "image": "docker://vcbusybox:latest"},
            {},
            fizzle_seconds=4,
            big_bytes=2**30,
            harmless_seconds=2,
            stop_grace_seconds=3,
        )
    if backend == "apptainer":
        request.getfixturevalue("apptainer")
        vcbusybox: Path = request.getfixturevalue("vcbusybox")
        sc_user: str = request.getfixturevalue("sc_user")
        return Engine(
            {"backend": "apptainer", "image": str(vcbusybox / "apptainer" / "vcbusybox")},
            {"cgroup_parent": cgroup_parent, "sc_user": sc_user},
            fizzle_seconds=4,
            big_bytes=2**30,
            harmless_seconds=2,
            stop_grace_seconds=3,
        )
    request.getfixturevalue("qemu")
    request.getfixturevalue("sc_user")
    kernel, initrd = request.getfixturevalue("vm_artefacts")
    return Engine(
        {
            "backend": "vm",
            "image": str(kernel),
            "vm_initrd": str(initrd),
            "vm_kernel_append": "console=ttyS0 panic=-1",
        },
        {"mb_per_processor": 256, "disk_gb_per_processor": 1, "vm_accel": "auto"},
        fizzle_seconds=12,  # a TCG boot takes 3-10 s on this 2-core host
        big_bytes=64 * 2**20,
        harmless_seconds=6,
        stop_grace_seconds=5,
    )


def write_config(top: Path, backend: str, engine: Engine, scripts: dict[str, str]) -> Path:
    machinetypes = {}
    for name, script in scripts.items():
        user_data = top / f"user_data-{name}"
        user_data.write_text(script)
        user_data.chmod(0o755)
        machinetype = {
            **engine.machinetype,
            "user_data": str(user_data),
            "target_share": 1,
            "stop_grace_seconds": engine.stop_grace_seconds,
            "max_wallclock_seconds": 150,  # a heartbeat taken for good ends here, failing (e)
            "backoff_seconds": 3600,  # each hostile LM ends with an abort: it runs once
            "fizzle_seconds": 3600,  # an exit before it is an abort
        }
        if name in HEARTBEAT_TYPES:
            machinetype.update(
                fizzle_seconds=engine.fizzle_seconds,
                heartbeat_file=HEARTBEAT,
                heartbeat_seconds=2,
            )
        elif name == "harmless":
            machinetype.update(fizzle_seconds=0, backoff_seconds=0)
        machinetypes[name] = machinetype
    factory = {
        "space": f"hostile-{backend}.example.com",
        "hostname": f"hostile-{backend}.example.com",
        "state_dir": str(top / "state"),
        "total_processors": min(2, len(os.sched_getaffinity(0))),
        "overload_per_processor": 100,  # TCG guests and 1 GiB writes load this small host
        "disk_gb_per_processor": 2,  # each LM's own filesystem: room for the 1 GiB file
        **engine.factory,
    }
    path = top / "lmrunner.yaml"
    path.write_text(yaml.safe_dump({"factory": factory, "machinetypes": machinetypes}))
    return path


class Freshener(threading.Thread):
    """Keeps a host file's mtime fresh, as a heartbeat would be."""

    def __init__(self, path: Path) -> None:
        super().__init__(name="freshener", daemon=True)
        self.path = path
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            with contextlib.suppress(OSError):
                os.utime(self.path)


def file_state(path: Path) -> tuple[bytes, int] | None:
    try:
        return path.read_bytes(), path.stat().st_mtime_ns
    except OSError:
        return None


def watch(daemon: subprocess.Popen[bytes], observed: Observed, state: Path) -> None:
    """Follow the run until every hostile LM ended and a later LM started and finished."""
    started = last_progress = time.monotonic()
    drained_for: set[str] = set()
    draining = False
    while True:
        if daemon.poll() is not None:
            observed.died = f"the daemon exited with status {daemon.returncode}"
            return
        peak = daemons.peak_rss_bytes(daemon.pid) or 0
        snap = daemons.snapshot_retrying(state)
        if peak > observed.peak_rss + 2**20:
            running = [r.machinetype for r in snap.records if r.active] if snap else []
            observed.rss_growth.append(
                f"{peak / 2**20:.0f} MiB at {time.monotonic() - started:.1f} s (active: {running})"
            )
        observed.peak_rss = max(observed.peak_rss, peak)
        now = time.time()
        for record in snap.records if snap else []:
            if not record.active and record.uuid not in observed.ended_seen:
                observed.ended_seen[record.uuid] = now
                last_progress = time.monotonic()
        first = {t: lm for t in HOSTILE if snap and (lm := snap.first_of(t)) is not None}
        for name, lm in first.items():
            outputs = outputs_root(lm.directory) / "joboutputs"  # on the LM's own filesystem
            planted = outputs / "planted"
            with contextlib.suppress(FileNotFoundError):
                observed.planted_at.setdefault(name, planted.lstat().st_mtime)
                if (outputs / REFUSED).exists():
                    observed.refused.add(name)
        for name in HEARTBEAT_TYPES:
            lm = first.get(name)
            if lm is None:
                continue
            if lm.state is LmState.RUNNING and name in observed.planted_at:
                if name not in observed.logs_running:
                    if not draining:
                        daemons.cli(observed.config, "drain")
                        draining = True
                    drained_for.add(name)
                    observed.logs_running[name] = daemons.cli(observed.config, "logs", lm.name)
            elif not lm.active and name in drained_for and name not in observed.logs_ended:
                observed.logs_ended[name] = daemons.cli(observed.config, "logs", lm.name)
        if draining and drained_for <= set(observed.logs_ended):
            daemons.cli(observed.config, "undrain")
            draining = False
        if snap is not None and not draining and len(first) == len(HOSTILE):
            ends = [observed.ended_seen.get(lm.uuid) for lm in first.values()]
            if all(ends):
                last_end = max(lm.finished or 0.0 for lm in first.values())
                if any(
                    r.created > last_end and r.state is LmState.FINISHED and r.outcome is not None
                    for r in snap.records
                ):
                    return
        if time.monotonic() - started > RUN_SECONDS:
            observed.gave_up = f"gave up after {RUN_SECONDS:.0f} s"
            return
        if time.monotonic() - last_progress > STALL_SECONDS:
            observed.gave_up = f"no LM ended for {STALL_SECONDS:.0f} s"
            return
        time.sleep(0.25)


def finish(daemon: subprocess.Popen[bytes], observed: Observed, state: Path) -> None:
    """Drain, let the running LMs end, stop the daemon with SIGTERM."""
    if daemon.poll() is None:
        daemons.cli(observed.config, "drain")
        with contextlib.suppress(AssertionError):
            daemons.wait_for(
                lambda: (
                    (s := daemons.snapshot_retrying(state)) is not None
                    and not any(r.active for r in s.records)
                ),
                60 * TIMESCALE,
                "every LM ended after the drain",
            )
        observed.peak_rss = max(observed.peak_rss, daemons.peak_rss_bytes(daemon.pid) or 0)
        observed.exit_code = daemons.stop(daemon)
    observed.snapshot = daemons.snapshot_retrying(state)


def clean_up(
    config: Path, backend: str, state: Path, cgroup_parent: str, observed: Observed
) -> None:
    """Remove every LM the daemon left (they outlive it by design) and check nothing is left."""
    if not (state / "lmrunner.db").exists():
        return
    snap = daemons.snapshot_retrying(state)
    uuids = [r.uuid for r in snap.records] if snap else []
    try:
        remove_lms(config)
    except Exception as err:  # recorded; the safety nets below still run
        observed.cleanup_problems.append(f"remove_lms: {err!r}")
    if backend == "docker":
        import docker

        store = Store(state, readonly=True)
        factory_id = store.factory_id
        store.close()
        client = docker.from_env(timeout=60)
        try:
            label = f"org.lmrunner.factory={factory_id}"
            for container in client.containers.list(all=True, filters={"label": label}):
                observed.cleanup_problems.append(f"container {container.name} left; removed")
                container.remove(force=True)
        finally:
            client.close()
    left = daemons.processes_with(str(state))
    if left:
        observed.cleanup_problems.append(f"processes of the LMs left: {left}")
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, 9)
    cgroups = daemons.lm_cgroups(uuids, cgroup_parent)
    if cgroups:
        observed.cleanup_problems.append(f"LM cgroups left: {cgroups}")
        daemons.remove_cgroup_dirs(cgroups)


@pytest.fixture(scope="module", params=BACKENDS)
def observed(request: pytest.FixtureRequest) -> Iterator[Observed]:
    backend: str = request.param
    cgroup_parent = f"/lmrunner-test-hostile-{uuid_mod.uuid4().hex[:8]}"
    engine = engine_for(request, backend, cgroup_parent)
    cgroups = None
    if backend == "apptainer":
        # This controller makes the parent, so that release() removes it at the end even though
        # the daemon made the LM cgroups below it.
        cgroups = host_cgroups(FactoryConfig(space="x.example.com", cgroup_parent=cgroup_parent))
        if cgroups is None:
            pytest.skip("this host gives lmrunner no cgroups")
        cgroups.remove(cgroups.create("lm-probe"))
    top = Path(tempfile.mkdtemp(prefix=f"lmrunner-hostile-{backend}-"))
    top.chmod(0o755)  # LMs of the unprivileged account reach their folders below it
    outside = top / "outside"  # the host's: no LM account can read or write here
    outside.mkdir(mode=0o700)
    token = uuid_mod.uuid4().hex
    secret = outside / "secret"
    secret.write_text(f"300 secret {token}\n")
    secret.chmod(0o600)
    beat = outside / "beat"
    beat.write_text("")
    state = top / "state"
    scripts = payloads(
        outside / "created-through-a-link", secret, beat, engine.big_bytes, engine.harmless_seconds
    )
    config = write_config(top, backend, engine, scripts)
    before = file_state(secret)
    assert before is not None
    observed = Observed(
        backend, config, secret, before, dangling=outside / "created-through-a-link", token=token
    )
    log = top / "daemon.log"
    freshener = Freshener(beat)
    freshener.start()
    daemon = start_daemon(config, log)
    daemons.cap_memory(daemon.pid)
    try:
        watch(daemon, observed, state)
        finish(daemon, observed, state)
        observed.log_text = log.read_text(errors="replace")
        observed.secret_after = file_state(secret)
        observed.outside_after = sorted(p.name for p in outside.iterdir())
    finally:
        daemons.kill(daemon)
        freshener.done.set()
        freshener.join()
        try:
            clean_up(
                config, backend, state, engine.factory.get("cgroup_parent", "/lmrunner"), observed
            )
        finally:
            if cgroups is not None:
                cgroups.release()
                left = [p for h in Path("/sys/fs/cgroup").iterdir()
                        if (p := h / cgroup_parent.strip("/")).exists()]  # fmt: skip
                if left:
                    observed.cleanup_problems.append(f"cgroups left: {left}")
            shutil.rmtree(top, ignore_errors=True)
    print(f"{backend}: peak RSS {observed.peak_rss / 2**20:.0f} MiB, "
          f"{len(observed.snapshot.records) if observed.snapshot else 0} LMs")  # fmt: skip
    yield observed


# --- the daemon -----------------------------------------------------------------------------------


def test_the_daemon_survives_and_goes_on_starting_lms(observed: Observed) -> None:
    # Every problem at once: one (the VM's RSS) must not hide the others.
    problems = [observed.died, observed.gave_up, observed.rss_ok()]
    if "Traceback" in observed.log_text:
        problems.append("a traceback in the daemon's log")
    if observed.exit_code != 0:
        problems.append(f"SIGTERM: exit status {observed.exit_code}")
    snap = observed.snapshot or daemons.Snapshot([], [], False)
    for name in HOSTILE:
        lm = snap.first_of(name)
        if lm is None or lm.active or lm.finished is None:
            problems.append(f"no {name} LM ran and ended: {lm}")
            continue
        if snap.accounted(lm.uuid) != 1:
            problems.append(f"{lm.name} ({name}): {snap.accounted(lm.uuid)} accounting records")
        if not any(r.created > lm.finished and r.state is LmState.FINISHED for r in snap.records):
            problems.append(f"no LM started and finished after {name}'s {lm.name} ended")
    for record in snap.records:  # every LM of the run ended and was accounted once
        if record.active or record.outcome is None or snap.accounted(record.uuid) != 1:
            problems.append(f"{record.name} ({record.machinetype}) not ended and accounted once")
    problems += observed.cleanup_problems
    found = [p for p in problems if p is not None]
    assert not found, "\n".join(found) + "\n" + observed.log_tail()


# --- (a) shutdown_message as a link out of the LM -------------------------------------------------


def test_shutdown_message_linked_to_a_missing_host_path_creates_nothing(observed: Observed) -> None:
    lm = observed.lm("hblink")
    assert lm.outcome is not None
    # The daemon writes its own reason where the payload left no message: never through a link.
    assert lm.outcome.source is not OutcomeSource.PAYLOAD, lm.outcome
    assert observed.outside_after == ["beat", "secret"], f"created in {observed.dangling.parent}"


def test_shutdown_message_linked_to_a_host_file_leaks_nothing(observed: Observed) -> None:
    lm = observed.lm("hbfifo")
    assert lm.outcome is not None
    assert observed.secret_after == observed.secret_before, "the secret host file was changed"
    assert observed.token not in lm.outcome.message, f"the secret became the outcome: {lm.outcome}"
    assert observed.snapshot is not None
    for accounted in observed.snapshot.accounting:
        assert observed.token not in accounted.outcome_text, accounted
    assert observed.token not in observed.log_text, "the secret is in the daemon's log"
    for when, runs in (("running", observed.logs_running), ("ended", observed.logs_ended)):
        assert "hbfifo" in runs, f"lmrunner logs was not run on the {when} {lm.name}"
        assert observed.token not in runs["hbfifo"].text(), (
            f"lmrunner logs of the {when} LM printed the secret:\n{runs['hbfifo'].text()}"
        )


# --- (b) any link in joboutputs -------------------------------------------------------------------


def test_lmrunner_logs_does_not_follow_a_link_to_a_host_file(observed: Observed) -> None:
    lm = observed.lm("hblink")
    for when, runs in (("running", observed.logs_running), ("ended", observed.logs_ended)):
        assert "hblink" in runs, f"lmrunner logs was not run on the {when} {lm.name}"
        run = runs["hblink"]
        assert run.returncode == 0, f"{run.argv}: {run.returncode} after {run.seconds:.1f} s"
        assert observed.token not in run.text(), (
            f"lmrunner logs of the {when} LM printed the secret behind joboutputs/leak:\n"
            f"{run.text()[:3000]}"
        )
    assert observed.secret_after == observed.secret_before


def test_lmrunner_logs_of_fifos_devices_and_huge_files_is_quick_and_bounded(
    observed: Observed,
) -> None:
    # hblink's joboutputs hold a FIFO, a link to /dev/zero and a 1 GiB sparse file.
    observed.lm("hblink")
    for when, runs in (("running", observed.logs_running), ("ended", observed.logs_ended)):
        run = runs.get("hblink")
        assert run is not None, f"lmrunner logs was not run on the {when} LM"
        assert not run.flooded, f"lmrunner logs printed more than {len(run.output)} bytes"
        assert run.returncode == 0, (
            f"lmrunner logs ({when}): status {run.returncode} after {run.seconds:.1f} s "
            f"(None: killed, it hung)\n{run.text()[-2000:]}"
        )
        assert len(run.output) < 4 * 2**20, f"lmrunner logs printed {len(run.output)} bytes"


# --- (c) and (d): a shutdown_message that is a FIFO, endless or huge ------------------------------


@pytest.mark.parametrize("machinetype", EXIT_TYPES)
def test_an_unreadable_shutdown_message_ends_the_lm_within_seconds(
    observed: Observed, machinetype: str
) -> None:
    lm = observed.lm(machinetype)
    assert lm.outcome is not None
    if machinetype in observed.refused:  # no FIFO to meet: the payload's own abort message
        assert observed.backend == "vm", f"mkfifo failed in a {observed.backend} LM"
        assert lm.outcome.message == FIFO_REFUSED, lm.outcome
    else:
        assert lm.outcome.source is not OutcomeSource.PAYLOAD, lm.outcome  # nothing there is one
    took = observed.ended_seen[lm.uuid] - observed.planted_at[machinetype]
    print(f"{machinetype}: recorded {took:.1f} s after the payload's last act: {lm.outcome}")
    assert took < END_SECONDS, f"{lm.name}'s end recorded {took:.0f} s after its payload's end"
    assert observed.died is None, observed.died
    if machinetype in ("zero", "big"):  # an endless or huge message: the daemon's memory
        assert observed.rss_ok() is None, observed.rss_ok()


# --- (e) a heartbeat that is a link or a FIFO -----------------------------------------------------


@pytest.mark.parametrize("machinetype", HEARTBEAT_TYPES)
def test_a_heartbeat_link_or_fifo_is_no_heartbeat(observed: Observed, machinetype: str) -> None:
    lm = observed.lm(machinetype)
    assert lm.outcome is not None
    assert (lm.outcome.code, lm.outcome.text, lm.outcome.source) == (
        700, "Heartbeat file not created", OutcomeSource.HEARTBEAT,
    ), lm.outcome  # fmt: skip
    if machinetype in observed.refused:
        assert observed.backend == "vm", f"mkfifo failed in a {observed.backend} LM"
    kind = "link" if machinetype == "hblink" else "FIFO"
    kind += " (refused by the engine: none planted)" if machinetype in observed.refused else ""
    print(f"{machinetype}: heartbeat {kind}, {lm.outcome}")
    assert lm.started is not None and lm.finished is not None
    # Stopped soon after fizzle_seconds, not at the wallclock backstop.
    assert lm.finished - lm.started < 60 * TIMESCALE, lm
