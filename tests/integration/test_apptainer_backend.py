"""The Apptainer backend on the real engine, driven by a real Factory, on this host's cgroups.

LMs run as the unprivileged sc_user inside a cgroup the factory creates under a parent of this
test's own (``/lmrunner-test-apptainer-<id>``), so nothing here touches cgroups it did not
create; every test removes its LMs, their cgroups and the parent. The LM directories live in a
0755 folder outside pytest's 0700 tmp_path, since the LMs' account must reach them.
The life-cycle scenarios shared with every backend are in tests/contract/.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid as uuid_mod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from lmrunner.backends.apptainer import PLACEMENT, ApptainerBackend
from lmrunner.backends.base import LABEL_FACTORY, LABEL_NAME, LABEL_UUID, MachineSpec
from lmrunner.cgroups import CgroupController, CgroupRef
from lmrunner.config import Config, FactoryConfig
from lmrunner.factory import Factory
from lmrunner.lifecycle import LmState, OutcomeSource
from lmrunner.lmcgroups import host_cgroups
from lmrunner.loader import load_config
from lmrunner.model import Limits, Mount
from lmrunner.state import LmRecord, Store
from tests.integration.conftest import (
    SLEEP_THEN_200,
    Factories,
    daemon_killed_and_restarted,
    drive,
    ended,
    first,
)

pytestmark = [pytest.mark.apptainer, pytest.mark.slow]


@dataclass
class Site:
    """One test's state folder and cgroup parent."""

    root: Path
    cgroup_parent: str
    sc_user: str
    image: Path
    factory: FactoryConfig | None = None  # of the last configuration made

    def config(self, script: str, **options: Any) -> Config:
        user_data = self.root / f"user_data-{uuid_mod.uuid4().hex[:6]}"
        user_data.write_text(script)
        user_data.chmod(0o755)
        factory = {
            "space": "apptainer.example.com",
            "hostname": "sctest.example.com",
            "state_dir": str(self.root / "state"),
            "total_processors": 1,
            "cgroup_parent": self.cgroup_parent,
            "sc_user": self.sc_user,
            **options.pop("factory", {}),
        }
        machinetype = {
            "backend": "apptainer",
            "image": str(self.image),
            "user_data": str(user_data),
            "target_share": 1,
            "fizzle_seconds": 0,
            "stop_grace_seconds": 2,
            **options,
        }
        path = self.root / "lmrunner.yaml"
        path.write_text(yaml.safe_dump({"factory": factory, "machinetypes": {"sc": machinetype}}))
        config = load_config(path, cpus=1)
        self.factory = config.factory
        return config


def remove_everything(site: Site, cgroups: CgroupController) -> None:
    """Kill and remove every LM of the factory in the site's state folder, and their cgroups."""
    state_dir = site.root / "state"
    if site.factory is None or not (state_dir / "lmrunner.db").exists():
        return
    store = Store(state_dir)
    try:
        backend = ApptainerBackend(site.factory, cgroups)
        for owned in backend.list_owned():
            if owned.factory == store.factory_id:
                backend.stop(owned.uuid, owned.handle, force=True)
                backend.destroy(owned.uuid, owned.handle)
        backend.close()
        for record in store.recent():
            if record.cgroup is not None:
                ref = CgroupRef.from_json(record.cgroup)
                cgroups.kill(ref)
                cgroups.remove(ref)
    finally:
        store.close()


@pytest.fixture
def site(apptainer: str, vcbusybox: Path, sc_user: str) -> Iterator[Site]:
    root = Path(tempfile.mkdtemp(prefix="lmrunner-apptainer-test-"))
    root.chmod(0o755)
    parent = f"/lmrunner-test-apptainer-{uuid_mod.uuid4().hex[:8]}"
    made = Site(root, parent, sc_user, vcbusybox / "apptainer" / "vcbusybox")
    # This test's controller creates the parent, so that release() removes it at the end even
    # when a daemon process made the LM cgroups below it.
    cgroups = host_cgroups(FactoryConfig(space="x.example.com", cgroup_parent=parent))
    if cgroups is None:
        pytest.skip("this host gives lmrunner no cgroups")
    cgroups.remove(cgroups.create("lm-probe"))
    yield made
    remove_everything(made, cgroups)
    cgroups.release()
    shutil.rmtree(root, ignore_errors=True)
    assert not leftovers(parent), f"cgroups left under {parent}"


def leftovers(parent: str) -> list[Path]:
    return [
        path
        for hierarchy in Path("/sys/fs/cgroup").iterdir()
        if (path := hierarchy / parent.strip("/")).exists()
    ]


@pytest.fixture
def factory_of(site: Site) -> Iterator[Callable[..., Factory]]:
    """``factory_of(config, **tuning)``: a factory tuned ``reconcile_seconds=5, **tuning``."""
    factories = Factories("apptainer")
    yield factories.make
    factories.close()


def processes_with(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (any account)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                if text in cmdline and str(os.getpid()) != entry.name:
                    found.append(int(entry.name))
    return found


def cgroup_of(factory: Factory, record: LmRecord) -> CgroupRef:
    fresh = factory.store.get(record.uuid)
    assert fresh is not None and fresh.cgroup is not None
    return CgroupRef.from_json(fresh.cgroup)


# --- outcomes -----------------------------------------------------------------------------------


def test_payload_outcome_300_makes_the_machinetype_back_off(
    site: Site, factory_of: Callable[..., Factory]
) -> None:
    script = '#!/bin/sh\necho "300 No more work" > "$JOBOUTPUTS/shutdown_message"\n'
    factory = factory_of(site.config(script, backoff_seconds=3600))
    drive(factory, lambda: bool(factory.store.recent()))
    lm = first(factory)
    drive(factory, lambda: ended(factory, lm.uuid))
    done = factory.store.get(lm.uuid)
    assert done is not None and done.outcome is not None
    assert (done.outcome.code, done.outcome.text) == (300, "No more work")
    assert done.outcome.source is OutcomeSource.PAYLOAD
    assert done.cgroup is None  # accounted and removed by the core after destroy
    factory.run_pass()
    assert factory.store.active() == []  # backoff: nothing else starts


def test_memory_hog_is_oom_killed_and_recorded_as_oom(
    site: Site, factory_of: Callable[..., Factory]
) -> None:
    # 64 MiB per processor; the payload's shell doubles a string until the kernel kills it.
    script = '#!/bin/sh\nx=0123456789\nwhile :; do x="$x$x"; done\n'
    factory = factory_of(site.config(script, factory={"mb_per_processor": 64}))
    drive(factory, lambda: bool(factory.store.recent()))
    lm = first(factory)
    drive(factory, lambda: ended(factory, lm.uuid))
    done = factory.store.get(lm.uuid)
    assert done is not None and done.outcome is not None
    assert (done.outcome.code, done.outcome.source) == (700, OutcomeSource.OOM), done.outcome
    accounting = factory.store.accounting()
    assert accounting and accounting[-1].oom_kills >= 1
    print(f"OOM: {done.outcome.message}, oom_kills={accounting[-1].oom_kills}")


def test_two_busy_loops_in_a_one_processor_lm_use_one_cpu(
    site: Site, factory_of: Callable[..., Factory]
) -> None:
    script = "#!/bin/sh\n(while :; do :; done) & (while :; do :; done) & sleep 60\n"
    factory = factory_of(site.config(script))
    drive(factory, lambda: bool(factory.store.active()))
    record = factory.store.active()[0]
    ref = cgroup_of(factory, record)
    assert factory.cgroups is not None
    time.sleep(1.0)  # let both loops run
    start, started = factory.cgroups.usage(ref).cpu_seconds, time.monotonic()
    time.sleep(10.0)
    used = (factory.cgroups.usage(ref).cpu_seconds - start) / (time.monotonic() - started)
    print(f"two busy loops in a 1-processor apptainer LM: {used:.3f} CPUs over 10 s")
    assert 0.7 < used <= 1.05
    assert factory.cgroups.usage(ref).throttled_periods > 0


def test_apptainers_own_failure_is_a_site_outcome_naming_it(
    site: Site, factory_of: Callable[..., Factory]
) -> None:
    factory = factory_of(site.config("#!/bin/sh\n", container_command="/no/such/command"))
    drive(factory, lambda: bool(factory.store.recent()))
    lm = first(factory)
    drive(factory, lambda: ended(factory, lm.uuid))
    done = factory.store.get(lm.uuid)
    assert done is not None and done.outcome is not None
    assert (done.outcome.code, done.outcome.source) == (500, OutcomeSource.LOST), done.outcome
    assert done.outcome.text.startswith("Apptainer could not run the LM: ")
    assert "/no/such/command" in done.outcome.text


def test_a_registry_image_without_a_registry_is_a_clear_start_failure(
    site: Site, factory_of: Callable[..., Factory]
) -> None:
    config = site.config("#!/bin/sh\n", image="docker://registry.invalid/nothing:1")
    factory = factory_of(config)
    factory.run_pass()
    record = first(factory)
    assert record.state is LmState.FAILED
    assert record.outcome is not None and record.outcome.source is OutcomeSource.START_FAILED
    assert "docker://registry.invalid/nothing:1 is not here and cannot be pulled" in (
        record.outcome.text
    )
    assert "registry.invalid" in record.outcome.text.split("cannot be pulled", 1)[1]


# --- isolation, placement, environment ----------------------------------------------------------


def test_lm_runs_as_sc_user_with_its_hostname_binds_and_only_its_environment(
    site: Site, factory_of: Callable[..., Factory], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMRUNNER_HOST_SECRET", "must-not-leak")
    script = (
        "#!/bin/sh\necho payload-says-hello\n"
        'out="$JOBOUTPUTS/seen"\n'
        'echo "$(id -u) $(hostname) $MACHINEFEATURES $JOBFEATURES $JOBOUTPUTS" > "$out"\n'
        'echo "cpu=$(cat $JOBFEATURES/allocated_cpu) uuid=$LMRUNNER_LM_UUID" >> "$out"\n'
        'echo "secret=${LMRUNNER_HOST_SECRET:-none}" >> "$out"\n'
        'touch /tmp/x && echo tmp-writable >> "$out"\n'
        'touch /user_data 2>/dev/null || echo user_data-read-only >> "$out"\n'
        'touch $JOBFEATURES/x 2>/dev/null || echo jobfeatures-read-only >> "$out"\n'
        'echo "pid1=$(cat /proc/1/comm) ps=$(ls /proc | grep -c "^[0-9]")" >> "$out"\n'
    )
    factory = factory_of(site.config(script))
    drive(factory, lambda: bool(factory.store.recent()))
    lm = first(factory)
    drive(factory, lambda: ended(factory, lm.uuid))
    seen = (lm.directory / "joboutputs" / "seen").read_text().splitlines()
    uid = pwd.getpwnam(site.sc_user).pw_uid
    assert seen[0] == (
        f"{uid} {lm.name} {PLACEMENT.machinefeatures} {PLACEMENT.jobfeatures} "
        f"{PLACEMENT.joboutputs}"
    )
    assert seen[1] == f"cpu=1 uuid={lm.uuid}"
    assert seen[2] == "secret=none"  # --cleanenv: nothing of the daemon's environment
    assert seen[3:6] == ["tmp-writable", "user_data-read-only", "jobfeatures-read-only"]
    assert seen[6].startswith("pid1=appinit ")  # its own pid namespace
    assert "payload-says-hello" in (lm.directory / "apptainer.log").read_text()
    assert not (lm.directory / "mnt" / "workdir").exists()  # destroy removed the workdir
    done = factory.store.get(lm.uuid)
    assert done is not None and done.outcome is not None
    assert done.outcome.message == "200 Exited with status 0 without a shutdown_message"


def test_sif_image_runs(site: Site, factory_of: Callable[..., Factory]) -> None:
    sif = site.image.with_name("vcbusybox.sif")
    if not sif.exists():
        pytest.skip(f"{sif} not built (mksquashfs missing when images/vcbusybox/build ran)")
    script = '#!/bin/sh\necho "200 Intended work completed ok" > "$JOBOUTPUTS/shutdown_message"\n'
    factory = factory_of(site.config(script, image=str(sif)))
    drive(factory, lambda: bool(factory.store.recent()))
    lm = first(factory)
    drive(factory, lambda: ended(factory, lm.uuid))
    done = factory.store.get(lm.uuid)
    assert done is not None and done.outcome is not None
    assert done.outcome.message == "200 Intended work completed ok"
    assert not (lm.directory / "mnt" / "apptainer-tmp").exists()  # the unpacked SIF went too


# --- stop, kill, adoption -----------------------------------------------------------------------


def test_stop_ends_the_whole_tree_daemonised_grandchild_included(
    site: Site, factory_of: Callable[..., Factory]
) -> None:
    marker = str(6000 + os.getpid() % 1000)
    # The grandchild leaves the payload's session and ignores SIGTERM.
    script = (
        "#!/bin/sh\n"
        f"setsid sh -c \"trap '' TERM; sleep {marker}1 & wait\" &\n"
        f"sleep {marker}2 & wait\n"
    )
    factory = factory_of(site.config(script, stop_grace_seconds=3))
    drive(factory, lambda: bool(factory.store.active()))
    record = factory.store.active()[0]
    ref = cgroup_of(factory, record)
    assert factory.cgroups is not None
    deadline = time.monotonic() + 10
    while not processes_with(f"sleep {marker}1") and time.monotonic() < deadline:
        time.sleep(0.1)
    grandchild = processes_with(f"sleep {marker}1")
    assert grandchild and set(grandchild) <= factory.cgroups.pids(ref)  # in the LM's cgroup
    factory.store.add_request(record.uuid, "stop", 3)
    drive(factory, lambda: ended(factory, record.uuid))
    done = factory.store.get(record.uuid)
    assert done is not None and done.outcome is not None
    assert (done.outcome.code, done.outcome.source) == (100, OutcomeSource.OPERATOR)
    assert processes_with(f"sleep {marker}") == []  # nothing left in the process table
    assert factory.cgroups.pids(ref) == frozenset()
    assert not any(Path(path).exists() for _, path in ref.paths)  # the core removed it


def test_closed_daemon_lm_is_adopted_not_restarted(
    site: Site, factory_of: Callable[..., Factory]
) -> None:
    script = (
        "#!/bin/sh\nsleep 4\necho '200 Intended work completed ok' > $JOBOUTPUTS/shutdown_message\n"
    )
    config = site.config(script)
    first_factory = factory_of(config)
    drive(first_factory, lambda: bool(first_factory.store.active()))
    record = first_factory.store.active()[0]
    first_factory.close()  # the daemon dies without stopping anything
    second = factory_of(config)
    active = second.store.active()
    assert [r.uuid for r in active] == [record.uuid]  # adopted, not restarted
    assert active[0].handle == record.handle
    drive(second, lambda: ended(second, record.uuid))
    done = second.store.get(record.uuid)
    assert done is not None and done.outcome is not None
    assert done.outcome.message == "200 Intended work completed ok"
    assert [r.uuid for r in second.store.recent()].count(record.uuid) == 1


def test_daemon_killed_with_sigkill_adopts_its_lm(site: Site) -> None:
    state = site.config(SLEEP_THEN_200).factory.state_dir
    log = site.root / "daemon.log"
    with daemon_killed_and_restarted(site.root / "lmrunner.yaml", state, log) as (running, done):
        pid = running.handle.data["pid"] if running.handle else None
        assert done.handle is not None and done.handle.data["pid"] == pid  # adopted


def test_orphan_processes_are_found_by_label_and_removed_others_left_alone(
    site: Site, factory_of: Callable[..., Factory], sc_user: str
) -> None:
    marker = str(7000 + os.getpid() % 1000)
    # target_share 0: the factory starts nothing itself; the orphan is made by hand below.
    factory = factory_of(site.config("#!/bin/sh\n", target_share=0), orphan_grace_seconds=0)
    backend = factory.backends["apptainer"]
    account = pwd.getpwnam(sc_user)
    decoy = subprocess.Popen(  # an sc_user process that is not lmrunner's
        ["sleep", f"{marker}9"],
        user=account.pw_uid,
        group=account.pw_gid,
        extra_groups=[],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        directory = site.root / "orphan"
        directory.mkdir(mode=0o755)
        user_data = directory / "user_data"
        user_data.write_text(f"#!/bin/sh\nsleep {marker}1\n")
        user_data.chmod(0o755)
        uuid = str(uuid_mod.uuid4())
        spec = MachineSpec(
            uuid=uuid, name="orphan.example.com", machinetype="sc", image=str(site.image),
            command=("/user_data",), limits=Limits(1, 2**30, 0, 0, None),
            mounts=(Mount(user_data, PurePosixPath("/user_data")),), env={},
            labels={LABEL_FACTORY: factory.store.factory_id, LABEL_NAME: "orphan.example.com",
                    LABEL_UUID: uuid},
            directory=directory, owner=(account.pw_uid, account.pw_gid), stop_grace_seconds=1,
        )  # fmt: skip
        backend.validate(spec)
        handle = backend.start(spec)
        # The daemon "died" before recording it: no store record, no backend record.
        (site.root / "state" / "apptainer" / f"{uuid}.json").unlink()
        deadline = time.monotonic() + 10
        while not processes_with(f"sleep {marker}1") and time.monotonic() < deadline:
            time.sleep(0.1)
        owned = {o.uuid: o for o in backend.list_owned()}
        assert uuid in owned, owned
        orphan = owned[uuid]
        assert (orphan.name, orphan.factory) == ("orphan.example.com", factory.store.factory_id)
        assert handle.data["pid"] in [pid for pid, _ in orphan.handle.data["pids"]]
        factory.run_pass()  # the reconcile removes it (grace 0)
        assert processes_with(f"sleep {marker}1") == []
        assert uuid not in {o.uuid for o in backend.list_owned()}
        assert decoy.poll() is None  # sc_user's other process lives on
    finally:
        decoy.kill()
        decoy.wait()
