"""lmrunner as a systemd service on the modern host, installed as docs/install.md says.

The tests run in order on one installed service (one test bed boot): readiness, LMs under it,
reload, restart adoption, the watchdog, the journal's LM fields, and the end of every LM
accounted once. Deadlines scale with LMRUNNER_TEST_TIMESCALE (TCG)."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import TIMESCALE
from tests.integration.systemd_host import install
from tests.integration.systemd_host.install import (
    CONFIG,
    UNIT,
    journal,
    messages,
    show,
    site_config,
    store,
    systemctl,
    wait_for,
    write_config,
)

pytestmark = [pytest.mark.systemd_host, pytest.mark.docker, pytest.mark.apptainer]

DROP_IN = Path("/run/systemd/system/lmrunner.service.d/testbed.conf")


@pytest.fixture(scope="module")
def installed(vcbusybox: Path) -> Iterator[list[float]]:
    top = Path(tempfile.mkdtemp(prefix="lmrunner-install-"))
    took = install.install_as_documented(top)
    print(f"docs/install.md: {len(took)} blocks in {sum(took):.1f} s ({took})")
    yield took
    subprocess.run(["lmrunner", "drain"], check=False)
    systemctl("stop", UNIT, check=False)


def running_uuids() -> set[str]:
    return {r.uuid for r in store().records if r.active}


def main_pid() -> int:
    return int(show("MainPID")["MainPID"])


def test_start_is_ready_after_adoption_within_seconds(installed: list[float]) -> None:
    assert show("ActiveState")["ActiveState"] == "active"
    systemctl("stop", UNIT)
    started = time.monotonic()
    systemctl("start", UNIT)  # Type=notify: returns on READY=1
    ready = time.monotonic() - started
    print(f"systemctl start lmrunner: READY after {ready:.2f} s")
    state = show("ActiveState", "SubState", "StatusText", "Type", "NotifyAccess")
    assert (state["ActiveState"], state["SubState"], state["Type"]) == (
        "active",
        "running",
        "notify",
    )
    assert ready < 30 * TIMESCALE
    assert state["StatusText"], state  # the daemon's STATUS= line


def test_docker_and_apptainer_lms_run_in_their_slices(installed: list[float]) -> None:
    def both() -> bool:
        active = [r for r in store().records if r.active and r.handle is not None]
        return {r.machinetype for r in active} == {"dock", "app"}

    wait_for(both, 120 * TIMESCALE, "a Docker and an Apptainer LM running")
    for record in store().records:
        if not record.active:
            continue
        slice_dir = (
            Path("/sys/fs/cgroup/lmrunner.slice")
            / f"lmrunner-lm_{record.uuid.replace('-', '_')}.slice"
        )
        assert slice_dir.is_dir(), slice_dir
        assert (slice_dir / "cpu.max").read_text().split() == ["100000", "100000"]
        assert int((slice_dir / "memory.max").read_text()) >= 256 << 20
        procs = [p for p in slice_dir.rglob("cgroup.procs") if p.read_text().strip()]
        assert procs, f"{record.machinetype}: nothing runs in {slice_dir}"
    # The daemon is not in any LM's slice, and no LM is in the service's cgroup.
    own = Path(f"/proc/{main_pid()}/cgroup").read_text()
    assert own.strip() == "0::/system.slice/lmrunner.service", own


def test_reload_applies_a_change_without_a_new_process(installed: list[float]) -> None:
    pid = main_pid()
    write_config(site_config(dock={"target_share": 3}))
    systemctl("reload", UNIT)
    wait_for(lambda: any("configuration reloaded" in m for m in messages(since_pid=pid)),
             30 * TIMESCALE, "the reload in the journal")  # fmt: skip
    assert main_pid() == pid
    assert any("dock" in m and "reload:" in m for m in messages(since_pid=pid))


def test_restart_adopts_every_running_lm_and_duplicates_none(installed: list[float]) -> None:
    before = running_uuids()
    assert len(before) == 2
    records_before = len(store().records)
    old = main_pid()
    systemctl("restart", UNIT)
    new = main_pid()
    assert new != old
    wait_for(lambda: sum("adopted" in m for m in messages(since_pid=new)) >= 2,
             30 * TIMESCALE, "both LMs adopted")  # fmt: skip
    assert running_uuids() == before
    time.sleep(3)  # a few passes: nothing new starts (the processors are full)
    assert len(store().records) == records_before


def test_a_hung_loop_is_restarted_by_the_watchdog(installed: list[float]) -> None:
    DROP_IN.parent.mkdir(parents=True, exist_ok=True)
    DROP_IN.write_text("[Service]\nWatchdogSec=10\n")
    try:
        systemctl("daemon-reload")
        systemctl("restart", UNIT)
        before = running_uuids()
        restarts = int(show("NRestarts")["NRestarts"])
        hung = main_pid()
        os.kill(hung, signal.SIGSTOP)  # the loop stops feeding the watchdog

        def restarted() -> bool:
            now = show("NRestarts", "MainPID", "ActiveState")
            return (int(now["NRestarts"]) > restarts and int(now["MainPID"]) not in (0, hung)
                    and now["ActiveState"] == "active")  # fmt: skip

        wait_for(restarted, 60 * TIMESCALE, "systemd restarted the hung daemon")
        assert any("Watchdog timeout" in str(e.get("MESSAGE")) for e in journal())
        new = main_pid()
        wait_for(lambda: sum("adopted" in m for m in messages(since_pid=new)) >= 2,
                 30 * TIMESCALE, "both LMs adopted after the watchdog restart")  # fmt: skip
        assert running_uuids() == before
    finally:
        DROP_IN.unlink(missing_ok=True)
        systemctl("daemon-reload")


def test_the_journal_carries_the_lm_fields(installed: list[float]) -> None:
    uuids = running_uuids()
    entries = [e for e in journal() if e.get("LM_UUID") in uuids]
    assert entries, "no journal entry with LM_UUID"
    assert {e.get("MACHINETYPE") for e in entries} == {"dock", "app"}
    assert all(e.get("LM_NAME") for e in entries)
    assert all(e.get("SYSLOG_IDENTIFIER") == "lmrunner" for e in entries)


def test_every_lm_ends_accounted_once_and_leaves_no_slice(installed: list[float]) -> None:
    assert subprocess.run(["lmrunner", "drain"], check=False).returncode == 0
    uuids = running_uuids()
    for record in store().records:
        if record.active:
            subprocess.run(["lmrunner", "kill", record.name], check=True, capture_output=True)
    wait_for(lambda: not running_uuids(), 120 * TIMESCALE, "every LM ended")
    snap = store()
    for uuid in uuids:
        assert snap.accounted(uuid) == 1, uuid

    def outcomes_logged() -> bool:
        ended = [e for e in journal() if e.get("LM_UUID") in uuids and e.get("OUTCOME_CODE")]
        return {e["LM_UUID"] for e in ended} == uuids

    try:
        wait_for(outcomes_logged, 30, "each LM's end in the journal with OUTCOME_CODE")
    except AssertionError:
        seen = [(e.get("MESSAGE"), e.get("LM_UUID"), e.get("OUTCOME_CODE")) for e in journal()]
        raise AssertionError(f"{uuids}: {seen[-12:]}") from None
    wait_for(lambda: not list(Path("/sys/fs/cgroup/lmrunner.slice").glob("lmrunner-lm_*")),
             30 * TIMESCALE, "every LM slice removed")  # fmt: skip
    assert CONFIG.exists()
