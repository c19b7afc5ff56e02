"""Faults around a real ``lmrunner daemon`` process: SIGKILL inside an LM's ending, an engine
raising unexpected errors, SIGHUP removing a running LM's machinetype (and SIGHUP storms), and
the state directory's filesystem full or read-only.

Faults inside the daemon are injected by running it through tests/integration/faulty_daemon.py,
which patches lmrunner or the Docker SDK in that process before calling lmrunner's main.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmrunner.lifecycle import LmState, OutcomeSource
from lmrunner.state import Store
from tests.integration import daemons
from tests.integration.conftest import TIMESCALE, remove_lms

pytestmark = pytest.mark.slow

DONE = "200 Intended work completed ok"


@dataclass
class Site:
    """One test's folder, configuration, state folder and daemon log."""

    top: Path
    config: Path
    state: Path
    log: Path

    def write(self, machinetypes: dict[str, dict[str, Any]], **factory: Any) -> None:
        document = {
            "factory": {
                "space": "faults.example.com",
                "hostname": "faults.example.com",
                "state_dir": str(self.state),
                "total_processors": min(2, len(os.sched_getaffinity(0))),
                "overload_per_processor": 100,
                "disk_gb_per_processor": 1,
                **factory,
            },
            "machinetypes": machinetypes,
        }
        self.config.write_text(yaml.safe_dump(document))

    def user_data(self, name: str, script: str) -> str:
        path = self.top / f"user_data-{name}"
        path.write_text(script)
        path.chmod(0o755)
        return str(path)

    def snapshot(self) -> daemons.Snapshot:
        """The store, read-only (empty before the daemon made it)."""
        return daemons.snapshot_retrying(self.state) or daemons.Snapshot([], [], False)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def clean(site: Site) -> list[Path]:
    """Remove the LMs a test's daemons left (they outlive them by design) and the cgroups of
    all its LMs; returns the cgroups that were still there."""
    if not (site.state / "lmrunner.db").exists():
        return []
    uuids = [r.uuid for r in site.snapshot().records]
    try:
        remove_lms(site.config)
    finally:
        left = daemons.lm_cgroups(uuids, "/lmrunner")
        daemons.remove_cgroup_dirs(left)
    return left


@pytest.fixture
def site() -> Iterator[Site]:
    top = Path(tempfile.mkdtemp(prefix="lmrunner-faults-"))
    top.chmod(0o755)
    made = Site(top, top / "lmrunner.yaml", top / "state", top / "daemon.log")
    try:
        yield made
        assert clean(made) == [], "cgroups of ended LMs were left"
    finally:
        clean(made)
        shutil.rmtree(top, ignore_errors=True)


@contextlib.contextmanager
def running(
    site: Site, *options: str, wrapper: tuple[str, ...] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """A daemon on the site; SIGKILLed at the end if the test left it running (it must not
    outlive the test). The test stops it itself to check its exit."""
    daemon = daemons.start(site.config, site.log, "--reconcile", "1", *options, wrapper=wrapper)
    try:
        yield daemon
    finally:
        daemons.kill(daemon)


def alive(daemon: subprocess.Popen[bytes], site: Site) -> None:
    assert daemon.poll() is None, f"the daemon exited ({daemon.returncode}):\n{tail(site)}"


def tail(site: Site) -> str:
    return site.log_text()[-4000:]


def wait_alive(
    daemon: subprocess.Popen[bytes], site: Site, condition: Any, timeout: float, what: str
) -> None:
    """Wait for ``condition()``, failing at once if the daemon dies meanwhile."""

    def check() -> object:
        alive(daemon, site)
        return condition()

    try:
        daemons.wait_for(check, timeout * TIMESCALE, what)
    except AssertionError as err:
        raise AssertionError(f"{err}\n{tail(site)}") from None


def drain_and_stop(daemon: subprocess.Popen[bytes], site: Site) -> None:
    """Drain, let every LM end, SIGTERM: the daemon exits 0 with no traceback in its log."""
    alive(daemon, site)
    assert daemons.cli(site.config, "drain").returncode == 0
    wait_alive(daemon, site, lambda: not any_lm(site, is_active=True), 60, "every LM ended")
    assert daemons.stop(daemon) == 0, tail(site)
    assert "Traceback" not in site.log_text(), tail(site)


def ended(site: Site, uuid: str) -> bool:
    record = site.snapshot().get(uuid)
    return record is not None and not record.active


def any_lm(
    site: Site,
    machinetype: str | None = None,
    *,
    after: float = 0.0,
    before: float = float("inf"),
    is_active: bool | None = None,
    state: LmState | None = None,
) -> bool:
    """Whether the store holds such an LM (of ``machinetype``, created in (after, before))."""
    return any(
        (machinetype is None or r.machinetype == machinetype)
        and after < r.created < before
        and (is_active is None or r.active is is_active)
        and (state is None or r.state is state)
        for r in site.snapshot().records
    )


def accounted_once(snap: daemons.Snapshot) -> None:
    """Every ended LM has its outcome and exactly one accounting record."""
    for record in snap.records:
        if not record.active:
            assert record.outcome is not None, record
            assert snap.accounted(record.uuid) == 1, (record, snap.accounted(record.uuid))


# --- Docker ---------------------------------------------------------------------------------------


def docker_lm(site: Site, script: str, **options: Any) -> dict[str, Any]:
    return {
        "backend": "docker",
        "image": "docker://vcbusybox:latest",
        "user_data": site.user_data("dc", script),
        "target_share": 1,
        "fizzle_seconds": 0,
        "stop_grace_seconds": 2,
        **options,
    }


def containers_of(docker_client: Any, site: Site) -> list[Any]:
    if not (site.state / "lmrunner.db").exists():
        return []
    store = Store(site.state, readonly=True)
    try:
        label = f"org.lmrunner.factory={store.factory_id}"
    finally:
        store.close()
    return list(docker_client.containers.list(all=True, filters={"label": label}))


@pytest.fixture
def docker_site(site: Site, docker_client: Any, vcbusybox: Path) -> Iterator[Site]:
    """A site whose LMs (containers outlive their daemon) are removed at the end."""
    try:
        yield site
    finally:
        for container in containers_of(docker_client, site):
            container.remove(force=True)


@pytest.mark.docker
def test_sigkill_inside_an_lms_ending_loses_and_duplicates_nothing(
    docker_site: Site, docker_client: Any
) -> None:
    site = docker_site
    script = f"#!/bin/sh\nsleep 1\necho '{DONE}' > $JOBOUTPUTS/shutdown_message\n"
    site.write({"dc": docker_lm(site, script)}, total_processors=1)
    marker = site.top / "in-destroy"
    wrapper = ("-m", "tests.integration.faulty_daemon", "destroy-sleeps", str(marker), "--")
    with running(site, wrapper=wrapper) as first:
        wait_alive(first, site, marker.exists, 60, "an LM's ending reached destroy")
        first.send_signal(signal.SIGKILL)
        first.wait()
    uuid = marker.read_text()
    (container,) = [c for c in containers_of(docker_client, site) if uuid in str(c.labels)]
    assert daemons.cli(site.config, "drain").returncode == 0  # the next daemon only settles
    with running(site) as second:
        # Within the reconcile period (1 s) and a pass or two.
        wait_alive(
            second,
            site,
            lambda: not containers_of(docker_client, site),
            15,
            f"the ended LM's container {container.short_id} was removed",
        )
        snap = site.snapshot()
        killed = snap.get(uuid)
        assert killed is not None and killed.state is LmState.FINISHED, killed
        assert killed.outcome is not None and killed.outcome.message == DONE, killed.outcome
        assert [r.uuid for r in snap.records].count(uuid) == 1
        accounted_once(snap)
        assert snap.accounted(uuid) == 1
        drain_and_stop(second, site)
    accounted_once(site.snapshot())


@pytest.mark.docker
def test_docker_errors_on_kill_and_remove_leave_the_daemon_running_and_are_retried(
    docker_site: Site, docker_client: Any
) -> None:
    site = docker_site
    site.write({"dc": docker_lm(site, "#!/bin/sh\nsleep 600 & wait $!\n")}, total_processors=1)
    injected = site.top / "injected"
    wrapper = ("-m", "tests.integration.faulty_daemon", "docker-errors", str(injected), "2", "--")
    with running(site, wrapper=wrapper) as daemon:
        wait_alive(daemon, site, lambda: any_lm(site, state=LmState.RUNNING), 60, "an LM runs")
        assert daemons.cli(site.config, "drain").returncode == 0  # that LM is the only one
        lm = next(r for r in site.snapshot().records if r.state is LmState.RUNNING)
        assert lm.handle is not None
        stop = daemons.cli(site.config, "stop", lm.name)
        assert stop.returncode == 0, stop.text()
        wait_alive(daemon, site, lambda: ended(site, lm.uuid), 60, f"{lm.name} ended")
        wait_alive(
            daemon,
            site,
            lambda: not containers_of(docker_client, site),
            60,
            f"{lm.name}'s container removed",
        )
        faults = injected.read_text().split() if injected.exists() else []
        assert faults[0::2].count("kill") == 2, f"injected: {faults}"  # the path was exercised
        assert faults[0::2].count("remove") == 2, f"injected: {faults}"
        snap = site.snapshot()
        done = snap.get(lm.uuid)
        assert done is not None and done.outcome is not None
        assert (done.outcome.code, done.outcome.source) == (100, OutcomeSource.OPERATOR), done
        assert snap.accounted(lm.uuid) == 1
        finished_lines = [
            line
            for line in site.log_text().splitlines()
            if f"lm={lm.name} " in line and ": finished: " in line
        ]
        assert len(finished_lines) == 1, finished_lines  # its end recorded once
        alive(daemon, site)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, tail(site)


# --- SIGHUP ---------------------------------------------------------------------------------------


def fake(seconds: float, share: float = 1) -> dict[str, Any]:
    return {
        "backend": "fake",
        "image": f"fake:seconds={seconds};message={DONE}",
        "target_share": share,
        "fizzle_seconds": 0,
        "stop_grace_seconds": 1,
    }


def test_sighup_removing_a_running_lms_machinetype_and_sighup_storms(site: Site) -> None:
    site.write({"a": fake(1), "b": fake(4)})
    try:
        with running(site) as daemon:
            wait_alive(daemon, site, lambda: any_lm(site, "b", is_active=True), 30, "a b LM runs")
            b_lm = next(r for r in site.snapshot().records if r.machinetype == "b" and r.active)
            reloads = site.log_text().count("configuration reloaded")
            site.write({"a": fake(1)})
            daemon.send_signal(signal.SIGHUP)
            wait_alive(
                daemon,
                site,
                lambda: site.log_text().count("configuration reloaded") > reloads,
                20,
                "the reload without b",
            )
            reloaded = time.time()
            assert not ended(site, b_lm.uuid), "b ended before the reload: make it longer"
            wait_alive(daemon, site, lambda: ended(site, b_lm.uuid), 20, f"b's {b_lm.name} ended")
            done = site.snapshot().get(b_lm.uuid)
            assert done is not None and done.outcome is not None
            assert done.outcome.message == DONE, done.outcome  # finished as usual
            assert site.snapshot().accounted(b_lm.uuid) == 1

            # A storm: SIGHUPs in quick succession, some with the file rewritten in between.
            for share in (1, 2, 1, 2, 1):
                site.write({"a": fake(1, share)})
                for _ in range(4):
                    daemon.send_signal(signal.SIGHUP)
            storm = time.time()
            wait_alive(
                daemon,
                site,
                lambda: any_lm(site, after=storm + 0.5, is_active=False),
                20,
                "an LM started and finished after the SIGHUP storm",
            )
            snap = site.snapshot()
            later = [r for r in snap.records if r.created > reloaded]
            assert later and {r.machinetype for r in later} == {"a"}, [
                (r.name, r.machinetype) for r in later
            ]
            drain_and_stop(daemon, site)
        accounted_once(site.snapshot())
    finally:
        clean(site)


# --- the state directory's filesystem full or read-only -------------------------------------------

IMAGE_BYTES = 128 * 2**20


@dataclass
class SmallFs:
    """A small ext4 filesystem on a loop device, mounted at ``mount``."""

    mount: Path
    device: str
    readonly_over: Path | None = None  # a read-only bind mount stacked on this folder

    def fill(self) -> Path:
        """Allocate every free block (root uses reserved ones too: mkfs -m 0 has none)."""
        filler = self.mount / "filler"
        with filler.open("wb") as out:
            offset = 0
            chunk = os.statvfs(self.mount).f_bavail * os.statvfs(self.mount).f_frsize
            while chunk >= 4096:
                try:
                    os.posix_fallocate(out.fileno(), offset, chunk)
                    offset += chunk
                except OSError as err:
                    if err.errno != errno.ENOSPC:
                        raise
                    chunk //= 2
        return filler

    def make_readonly(self, folder: Path) -> None:
        """Stack a read-only bind mount of ``folder`` on itself.

        ``mount -o remount,ro`` is refused (EBUSY) while any file on the filesystem is open for
        writing, and the daemon keeps its database and lock file open: Linux cannot turn a
        filesystem read-only under a writer except after an error (irreversibly). The stacked
        read-only mount is what the daemon then sees through the path: ``statvfs`` says
        read-only and every file created, replaced or opened anew fails with EROFS; only the
        descriptors it already holds (the database) still write. Unmounting it is "back to rw".
        """
        subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
        self.readonly_over = folder
        # Not atomic with util-linux < 2.39: a file the daemon opens for writing on the fresh
        # mount meanwhile makes the remount fail with EBUSY until it is closed.
        retry(["mount", "-o", "remount,bind,ro", str(folder)])

    def make_writable(self) -> None:
        if self.readonly_over is not None:
            try:
                retry(["umount", str(self.readonly_over)])
            except AssertionError:  # still busy: detach it; new lookups see the rw mount
                subprocess.run(["umount", "--lazy", str(self.readonly_over)], check=True)
            self.readonly_over = None


def retry(argv: list[str], seconds: float = 3.0) -> None:
    """Run ``argv`` until it succeeds (a mount busy for a moment), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        done = subprocess.run(argv, check=False, capture_output=True, text=True)
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{' '.join(argv)}: {done.stderr.strip()}")
        time.sleep(0.05)


@pytest.fixture
def small_fs() -> Iterator[SmallFs]:
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem needs root")
    for program in ("mkfs.ext4", "losetup", "mount", "umount"):
        if shutil.which(program) is None:
            pytest.skip(f"{program} not on PATH")
    top = Path(tempfile.mkdtemp(prefix="lmrunner-smallfs-"))
    top.chmod(0o755)
    image, mount = top / "state.img", top / "mnt"
    mount.mkdir()
    with image.open("wb") as out:
        out.truncate(IMAGE_BYTES)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], check=True)
    device = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    fs = SmallFs(mount, device)
    try:
        subprocess.run(["mount", device, str(mount)], check=True)
        try:
            yield fs
        finally:
            with contextlib.suppress(subprocess.CalledProcessError):
                fs.make_writable()
            # -R: an LM disk a failed test left mounted inside must not keep this one busy.
            subprocess.run(["umount", "--recursive", str(mount)], check=True)
    finally:
        subprocess.run(["losetup", "-d", device], check=True)
        shutil.rmtree(top, ignore_errors=True)


def problem_lines(text: str) -> list[str]:
    """The ERROR and WARNING lines of a log, without their time, numbers as #."""
    out = []
    for line in text.splitlines():
        if "level=ERROR" in line or "level=WARNING" in line:
            out.append(re.sub(r"\d+", "#", line.split(" ", 2)[-1]))
    return out


def test_full_and_read_only_state_directory_pause_starts_and_lose_nothing(
    site: Site, small_fs: SmallFs
) -> None:
    site.state = small_fs.mount / "state"
    site.write({"quick": fake(2)}, disk_gb_per_processor=0.01)  # the state fs holds 100 MB
    try:
        with running(site) as daemon:
            wait_alive(daemon, site, lambda: any_lm(site, is_active=False), 30, "an LM ended")
            for what, reason in (("full", ("full", "no space")), ("read-only", ("read-only",))):
                # LMs are short and follow each other: block while one runs, not in a gap.
                wait_alive(daemon, site, lambda: any_lm(site, state=LmState.RUNNING), 30,
                           "an LM running")  # fmt: skip
                before = site.snapshot()
                offset = len(site.log_text())
                if what == "full":
                    filler = small_fs.fill()
                else:
                    small_fs.make_readonly(site.state)
                since = time.time()
                info = os.statvfs(site.state)
                free_mib = info.f_bavail * info.f_frsize / 2**20
                time.sleep(8)  # several passes and reconciles (--reconcile 1)
                alive(daemon, site)
                during = site.snapshot()
                window = site.log_text()[offset:]
                if what == "full":
                    filler.unlink()
                else:
                    small_fs.make_writable()
                freed = time.time()

                new = [r.name for r in during.records if r.created > since + 1.5]
                assert new == [], f"{what}: LMs started meanwhile: {new}\n{window}"
                for old in before.records:  # nothing already stored was lost
                    kept = during.get(old.uuid)
                    assert kept is not None, f"{what}: {old.name} vanished"
                    if not old.active:
                        assert kept.outcome == old.outcome, (old, kept)
                        assert during.accounted(old.uuid) == 1, old
                lines = problem_lines(window)
                active = [r.uuid for r in before.records if r.active]
                assert active, f"{what}: no LM ran when the state directory was blocked"
                gone = [u for u in active if (d := during.get(u)) is not None and not d.active]
                print(f"{what}: {free_mib:.1f} MiB free; of {len(active)} LMs running, "
                      f"{len(gone)} recorded as ended meanwhile; logged {lines}")  # fmt: skip
                assert any(word in line.lower() for line in lines for word in reason), (
                    f"{what}: the reason is not logged:\n{window}"
                )
                repeated = {line: lines.count(line) for line in lines if lines.count(line) > 3}
                assert not repeated, f"{what}: logged again and again: {repeated}\n{window}"

                wait_alive(
                    daemon,
                    site,
                    lambda freed=freed: any_lm(site, after=freed, is_active=False),
                    30,
                    f"an LM started and finished after the {what} state directory recovered",
                )
                wait_alive(
                    daemon,
                    site,
                    lambda freed=freed: not any_lm(site, before=freed, is_active=True),
                    30,
                    f"the LMs of the {what} time ended",
                )
                accounted_once(site.snapshot())
            drain_and_stop(daemon, site)
    finally:
        small_fs.make_writable()
        with contextlib.suppress(FileNotFoundError):
            (small_fs.mount / "filler").unlink()
        left = clean(site)  # here: the filesystem goes with the fixture
    assert left == [], "cgroups of ended LMs were left"
