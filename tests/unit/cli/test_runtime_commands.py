"""The runtime subcommands on the state store: ps, stop, kill, drain, undrain, logs and daemon.

They run in-process through :func:`lmrunner.cli.main` on a real store in a temporary directory;
the daemon runs fake LMs (files plus time), so nothing here starts a process.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from lmrunner import loader as config_mod
from lmrunner.cli import COMMANDS, build_parser, main
from lmrunner.lifecycle import LmState, Outcome, OutcomeSource
from lmrunner.model import Handle, Limits
from lmrunner.state import DB_NAME, LmRecord, Store

HEADER = [
    "NAME", "MACHINETYPE", "BACKEND", "STATE", "PROCS", "UPTIME", "CPU%", "MEM", "DISK", "OUTCOME",
]  # fmt: skip
PS_KEYS = {
    "engine",
    "name",
    "uuid",
    "machinetype",
    "backend",
    "state",
    "processors",
    "created",
    "started",
    "finished",
    "shutdown_time",
    "cpu_seconds",
    "memory_bytes",
    "memory_peak_bytes",
    "disk_bytes",
    "disk_peak_bytes",
    "outcome",
    "measured",
}
WORK_DONE = Outcome(200, "Intended work completed ok", OutcomeSource.PAYLOAD)
CONFIG = """\
factory:
  space: space.example.com
  hostname: factory.example.com
  state_dir: {state}
  total_processors: 1
  overload_per_processor: 1000000
  disk_method: none  # a loop-mounted disk per LM needs mkfs and mount: integration tests
machinetypes:
  quick:
    backend: fake
    image: "fake:seconds=3600;message=200 Intended work completed ok"
    target_share: 1
"""
LM_NAME = "factory-00.example.com"  # slot 0 of factory.example.com


@pytest.fixture(autouse=True)
def _this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # No test here may depend on the developer's $LMRUNNER_CONFIG, FQDN or CPU count.
    monkeypatch.delenv("LMRUNNER_CONFIG", raising=False)
    monkeypatch.setattr("socket.getfqdn", lambda: "factory.example.com")
    monkeypatch.setattr(config_mod, "usable_cpus", lambda: 4)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def store(state: Path) -> Iterator[Store]:
    opened = Store(state)
    yield opened
    opened.close()


@pytest.fixture
def site(tmp_path: Path, state: Path) -> Path:
    path = tmp_path / "lmrunner.yaml"
    path.write_text(CONFIG.format(state=state))
    return path


@pytest.fixture
def daemon_sandbox(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, Any]]:
    """The daemon's signal handlers are recorded, not installed; logging is put back after."""
    installed: list[tuple[int, Any]] = []
    monkeypatch.setattr(
        signal, "signal", lambda signum, handler: installed.append((signum, handler))
    )
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    return installed


def lm(
    state: Path,
    name: str,
    slot: int,
    *,
    lm_state: LmState = LmState.RUNNING,
    processors: int = 1,
    age: float = 3600.0,
    **changes: Any,
) -> LmRecord:
    now = time.time()
    values: dict[str, Any] = {
        "uuid": f"uuid-{name}",
        "name": name,
        "machinetype": "quick",
        "backend": "fake",
        "slot": slot,
        "processors": processors,
        "limits": Limits(processors, processors * 2048 << 20, 0, 0, None),
        "hs06": float(processors),
        "shutdown_time": int(now + 86400),
        "directory": state / "machines" / name,
        "created": now - age,
        "state": lm_state,
        "started": now - age + 1,
    }
    values.update(changes)
    return LmRecord(**values)


def finished(state: Path, name: str, slot: int, *, age: float = 7200.0) -> LmRecord:
    now = time.time()
    return lm(
        state,
        name,
        slot,
        lm_state=LmState.FINISHED,
        age=age,
        finished=now - 60,
        outcome=WORK_DONE,
        cpu_seconds=30.0,
        memory_peak_bytes=512 << 20,
    )


def run(*argv: str | Path) -> int:
    return main([str(arg) for arg in argv])


@contextmanager
def _opened(directory: Path) -> Iterator[Store]:
    opened = Store(directory)
    try:
        yield opened
    finally:
        opened.close()


# --- ps ---------------------------------------------------------------------------------------


def test_ps_table_has_the_columns_one_line_per_active_lm_and_a_totals_line(
    state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    store.insert_many(
        [
            lm(state, "vac01-00.example.com", 0, processors=2, cpu_seconds=3600.0),
            lm(state, "vac01-02.example.com", 2, lm_state=LmState.STOPPING),
            finished(state, "vac01-01.example.com", 1),
        ]
    )
    assert run("ps", "--state-dir", state) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == HEADER
    assert lines[0].startswith("NAME  ") and "  MACHINETYPE  " in lines[0]
    assert [line.split()[0] for line in lines[1:-1]] == [
        "vac01-00.example.com",
        "vac01-02.example.com",
    ]
    first = lines[1].split()
    assert first[1:5] == ["quick", "fake", "running", "2"]
    assert first[5].count(":") == 2  # uptime H:MM:SS
    assert first[6] == "50.0"  # an hour of CPU over an hour on two processors
    assert first[7:] == ["-", "-", "-"]
    assert lines[-1] == "2 active LMs using 3 processors"


def test_ps_all_adds_finished_lms_and_counts_them(
    state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    store.insert_many(
        [
            lm(state, "vac01-00.example.com", 0),
            finished(state, "vac01-01.example.com", 1, age=7200),
            finished(state, "vac01-02.example.com", 2, age=9000),
        ]
    )
    assert run("ps", "--all", "--state-dir", state) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == HEADER
    names = [line.split()[0] for line in lines[1:-1]]
    # Active LMs first, then ended ones newest first.
    assert names == ["vac01-00.example.com", "vac01-01.example.com", "vac01-02.example.com"]
    assert lines[2].split()[3] == "finished"
    assert lines[2].endswith("  512M  -     200 Intended work completed ok")
    assert lines[-1] == "1 active LMs using 1 processors; 2 ended"


def test_ps_of_an_empty_store(
    state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("ps", "--state-dir", state) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == HEADER
    assert lines[1:] == ["0 active LMs using 0 processors"]


def test_ps_quiet_prints_names_only(
    state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    store.insert_many(
        [lm(state, "vac01-00.example.com", 0), finished(state, "vac01-01.example.com", 1)]
    )
    assert run("ps", "-q", "--state-dir", state) == 0
    assert capsys.readouterr().out == "vac01-00.example.com\n"
    assert run("ps", "-q", "-a", "--state-dir", state) == 0
    assert capsys.readouterr().out == "vac01-00.example.com\nvac01-01.example.com\n"


def test_ps_json_shows_what_the_backend_says_of_its_engine(
    state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    facts = {"accel": "tcg", "boot": "kernel-pvh", "pid": "4242"}
    handle = Handle(1, {"pid": 4242, "secret": "backend's own"}, facts)
    store.insert_many([lm(state, "vac01-00.example.com", 0, handle=handle)])
    assert run("ps", "--json", "--state-dir", state) == 0
    (entry,) = json.loads(capsys.readouterr().out)["lms"]
    assert entry["engine"] == facts
    assert run("ps", "--state-dir", state) == 0
    assert "tcg" not in capsys.readouterr().out  # the table keeps its columns


def test_ps_json_document(state: Path, store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    running = lm(state, "vac01-00.example.com", 0)
    ended = finished(state, "vac01-01.example.com", 1)
    store.insert_many([running, ended])
    assert run("ps", "--json", "--state-dir", state) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["schema"] == "lmrunner.ps/1"
    assert document["factory"] == store.factory_id
    assert isinstance(document["generated"], float)
    assert [entry["name"] for entry in document["lms"]] == [running.name]
    entry = document["lms"][0]
    assert set(entry) == PS_KEYS
    assert entry["uuid"] == running.uuid
    assert (entry["machinetype"], entry["backend"], entry["state"]) == ("quick", "fake", "running")
    assert entry["processors"] == 1
    assert entry["created"] == running.created
    assert entry["started"] == running.started
    assert entry["finished"] is None
    assert entry["shutdown_time"] == running.shutdown_time
    assert entry["cpu_seconds"] is None
    assert entry["memory_bytes"] is None
    assert entry["memory_peak_bytes"] is None
    assert entry["outcome"] is None
    assert entry["engine"] == {}
    assert entry["measured"] == {
        "cpu_seconds": False,
        "memory_bytes": False,
        "memory_peak_bytes": False,
        "disk_bytes": False,
    }

    assert run("ps", "--json", "--all", "--state-dir", state) == 0
    lms = json.loads(capsys.readouterr().out)["lms"]
    assert [each["name"] for each in lms] == [running.name, ended.name]
    done = lms[1]
    assert set(done) == PS_KEYS
    assert done["state"] == "finished"
    assert done["finished"] == ended.finished
    assert done["outcome"] == {"code": 200, "text": WORK_DONE.text, "source": "payload"}
    assert done["cpu_seconds"] == 30.0
    assert done["memory_peak_bytes"] == 512 << 20
    assert done["measured"] == {
        "cpu_seconds": True,
        "memory_bytes": False,
        "memory_peak_bytes": True,
        "disk_bytes": False,
    }


def test_ps_with_state_dir_needs_no_configuration(
    state: Path, store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store.insert(lm(state, "vac01-00.example.com", 0))
    missing = tmp_path / "nowhere" / "lmrunner.yaml"
    assert run("ps", "-q", "--config", missing, "--state-dir", state) == 0
    assert capsys.readouterr().out == "vac01-00.example.com\n"


class _Refuse:
    """A meta path finder that fails any import of the named modules."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = set(names)
        self.attempted: list[str] = []

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname in self.names:
            self.attempted.append(fullname)
            raise ImportError(f"test: {fullname} must not be imported by ps")
        return None


def test_ps_with_state_dir_imports_no_configuration_modules(
    state: Path, store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store.insert(lm(state, "vac01-00.example.com", 0))
    heavy = ("lmrunner.config", "lmrunner.pipes", "yaml", "requests")
    for name in heavy:
        monkeypatch.delitem(sys.modules, name, raising=False)
    refuse = _Refuse(heavy)
    monkeypatch.setattr(sys, "meta_path", [refuse, *sys.meta_path])
    assert run("ps", "--state-dir", state) == 0
    assert refuse.attempted == []
    assert "1 active LMs using 1 processors" in capsys.readouterr().out


def test_ps_without_a_database_says_so_on_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("ps", "--state-dir", empty) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(f"lmrunner: {empty}: no state database yet")
    assert not (empty / DB_NAME).exists()  # ps never creates one


def test_ps_reads_the_configured_state_dir(
    site: Path, state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    store.insert(lm(state, "vac01-00.example.com", 0))
    assert run("ps", "-q", "--config", site) == 0
    assert capsys.readouterr().out == "vac01-00.example.com\n"


def test_lmrunner_config_environment_variable_is_honoured(
    site: Path,
    state: Path,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store.insert(lm(state, "vac01-00.example.com", 0))
    monkeypatch.setenv("LMRUNNER_CONFIG", str(site))
    assert run("ps", "-q") == 0
    assert capsys.readouterr().out == "vac01-00.example.com\n"
    assert run("drain") == 0
    assert store.meta("draining") == "1"


def test_config_option_wins_over_the_environment_variable(
    site: Path,
    state: Path,
    store: Store,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store.insert(lm(state, "vac01-00.example.com", 0))
    monkeypatch.setenv("LMRUNNER_CONFIG", str(tmp_path / "missing.yaml"))
    assert run("ps", "-q", "--config", site) == 0
    assert capsys.readouterr().out == "vac01-00.example.com\n"


def test_state_dir_overrides_the_configured_one_for_every_command(
    site: Path, state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    with _opened(other) as elsewhere:
        elsewhere.insert(lm(other, "vac01-05.example.com", 5))
    assert run("ps", "-q", "--config", site, "--state-dir", other) == 0
    assert capsys.readouterr().out == "vac01-05.example.com\n"
    assert run("drain", "--config", site, "--state-dir", other) == 0
    assert run("stop", "vac01-05.example.com", "--config", site, "--state-dir", other) == 0
    assert run("logs", "vac01-05.example.com", "--config", site, "--state-dir", other) == 0
    assert run("daemon", "--dry-run", "--config", site, "--state-dir", other) == 0
    assert "nothing would start: draining" in capsys.readouterr().out
    assert not state.exists()  # the configured state_dir was never touched
    with _opened(other) as elsewhere:
        assert elsewhere.meta("draining") == "1"
        assert elsewhere.take_requests() == [("uuid-vac01-05.example.com", "stop", None)]


# --- stop, kill ------------------------------------------------------------------------------


def test_stop_without_a_daemon_queues_the_request_and_says_so(
    state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    record = store.insert(lm(state, "vac01-00.example.com", 0))
    assert run("stop", record.name, "--state-dir", state) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"lmrunner: stop of {record.name} queued; no daemon runs on {state}, it acts when started\n"
    )
    assert store.take_requests() == [(record.uuid, "stop", None)]


def test_stop_with_a_grace_period(
    state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    record = store.insert(lm(state, "vac01-00.example.com", 0))
    assert run("stop", "--grace", "30", record.name, "--state-dir", state) == 0
    assert store.take_requests() == [(record.uuid, "stop", 30.0)]


@pytest.mark.parametrize("action", ["stop", "kill"])
def test_stop_and_kill_with_a_live_daemon(
    action: str, state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    record = store.insert(lm(state, "vac01-00.example.com", 0))
    store.set_meta("daemon_pid", str(os.getpid()))
    assert run(action, record.name, "--state-dir", state) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{action} requested for {record.name}\n"
    assert captured.err == ""
    assert store.take_requests() == [(record.uuid, action, None)]


@pytest.mark.parametrize("pid", ["4194305", "not-a-pid"])  # above any pid_max; garbage
def test_a_dead_daemon_pid_counts_as_no_daemon(
    pid: str, state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    record = store.insert(lm(state, "vac01-00.example.com", 0))
    store.set_meta("daemon_pid", pid)
    assert run("kill", record.name, "--state-dir", state) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no daemon runs on" in captured.err
    assert store.take_requests() == [(record.uuid, "kill", None)]


@pytest.mark.parametrize("action", ["stop", "kill"])
def test_stop_of_an_unknown_lm_lists_the_active_ones(
    action: str, state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    store.insert_many(
        [
            lm(state, "vac01-01.example.com", 1),
            lm(state, "vac01-00.example.com", 0),
            finished(state, "vac01-02.example.com", 2),
        ]
    )
    assert run(action, "vac01-09.example.com", "--state-dir", state) == 1
    assert capsys.readouterr().err == (
        "lmrunner: no LM named 'vac01-09.example.com' "
        "(active: vac01-00.example.com, vac01-01.example.com)\n"
    )
    assert store.take_requests() == []


def test_stop_of_an_unknown_lm_with_none_active(
    state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("stop", "vac01-09.example.com", "--state-dir", state) == 1
    assert capsys.readouterr().err.endswith("(active: none)\n")


@pytest.mark.parametrize("action", ["stop", "kill"])
def test_stop_of_a_finished_lm_fails(
    action: str, state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    record = store.insert(finished(state, "vac01-00.example.com", 0))
    assert run(action, record.name, "--state-dir", state) == 1
    assert capsys.readouterr().err == f"lmrunner: {record.name} is not active (finished)\n"
    assert store.take_requests() == []


def test_stop_acts_on_the_newest_lm_of_a_reused_name(
    state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    old = finished(state, "vac01-00.example.com", 0, age=7200)
    new = lm(state, "vac01-00.example.com", 0, age=60, uuid="uuid-new")
    store.insert_many([old, new])
    assert run("stop", new.name, "--state-dir", state) == 0
    assert store.take_requests() == [("uuid-new", "stop", None)]


# --- drain, undrain --------------------------------------------------------------------------


def test_drain_and_undrain_set_and_clear_the_flag(
    state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("drain", "--state-dir", state) == 0
    assert capsys.readouterr().out == "draining: no new LMs\n"
    assert store.meta("draining") == "1"
    assert run("drain", "--state-dir", state) == 0  # idempotent
    assert store.meta("draining") == "1"
    assert run("undrain", "--state-dir", state) == 0
    assert capsys.readouterr().out.endswith("not draining\n")
    assert store.meta("draining") is None
    assert run("undrain", "--state-dir", state) == 0
    assert store.meta("draining") is None


# --- logs ------------------------------------------------------------------------------------


def test_logs_prints_every_file_with_a_header(
    state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    record = store.insert(finished(state, "vac01-00.example.com", 0))
    joboutputs = record.directory / "joboutputs"
    joboutputs.mkdir(parents=True)
    (joboutputs / "shutdown_message").write_text("200 Intended work completed ok\n")
    (joboutputs / "payload.out").write_text("line 1\nline 2\n")
    (record.directory / "console.log").write_text("booted\n")
    (record.directory / "user_data").write_text("#!/bin/sh\n")  # not a log
    assert run("logs", record.name, "--state-dir", state) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out == (
        f"==> {record.directory / 'console.log'} <==\nbooted\n"
        f"==> {joboutputs / 'payload.out'} <==\nline 1\nline 2\n"
        f"==> {joboutputs / 'shutdown_message'} <==\n200 Intended work completed ok\n"
    )


def test_logs_never_show_what_a_payload_links_to(
    state: Path, store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A payload owns joboutputs/: links to host files, FIFOs and huge files are not followed,
    not waited on and not printed whole."""
    secret = tmp_path / "shadow"
    secret.write_text("root:secret-hash\n")
    record = store.insert(finished(state, "vac01-00.example.com", 0))
    joboutputs = record.directory / "joboutputs"
    joboutputs.mkdir(parents=True)
    (joboutputs / "leak").symlink_to(secret)
    (joboutputs / "shutdown_message").symlink_to(secret)
    os.mkfifo(joboutputs / "fifo")
    with (joboutputs / "huge.out").open("wb") as huge:
        huge.truncate(64 * 1024 * 1024)  # sparse: 64 MiB of NUL bytes
    (record.directory / "container.log").symlink_to(secret)
    assert run("logs", record.name, "--state-dir", state) == 0
    out = capsys.readouterr().out
    assert "secret-hash" not in out
    assert out.count("not shown") == 4  # the three links and the FIFO
    assert "… truncated: its last 1024 KiB" in out
    assert len(out) < 2 * 1024 * 1024


def test_logs_of_an_lm_without_logs(
    state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    record = store.insert(lm(state, "vac01-00.example.com", 0))
    assert run("logs", record.name, "--state-dir", state) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"lmrunner: {record.name} left no logs in {record.directory}\n"


def test_logs_of_an_unknown_lm(
    state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("logs", "vac01-09.example.com", "--state-dir", state) == 1
    assert "no LM named 'vac01-09.example.com'" in capsys.readouterr().err


# --- daemon ----------------------------------------------------------------------------------


def test_daemon_once_starts_an_lm_and_leaves_it_running(
    site: Path,
    state: Path,
    daemon_sandbox: list[tuple[int, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run("daemon", "--once", "--config", site) == 0
    assert {signum for signum, _ in daemon_sandbox} == {
        signal.SIGHUP,
        signal.SIGTERM,
        signal.SIGINT,
    }
    capsys.readouterr()
    assert run("ps", "--json", "--config", site) == 0
    lms = json.loads(capsys.readouterr().out)["lms"]
    assert [(each["name"], each["machinetype"], each["state"]) for each in lms] == [
        (LM_NAME, "quick", "running")
    ]
    with _opened(state) as store:
        assert store.meta("daemon_pid") is None  # cleared on the way out
        (record,) = store.active()
    assert (state / "fake-engine" / f"{record.uuid}.json").exists()  # still "running"
    assert (record.directory / "joboutputs").is_dir()

    # A second pass adopts it and starts nothing more: its one processor is in use.
    assert run("daemon", "--once", "--config", site) == 0
    assert run("ps", "-q", "-a", "--config", site) == 0
    assert capsys.readouterr().out == f"{LM_NAME}\n"


def test_daemon_carries_out_a_kill_queued_while_it_was_down(
    site: Path,
    state: Path,
    daemon_sandbox: list[tuple[int, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run("daemon", "--once", "--config", site) == 0
    assert run("kill", LM_NAME, "--config", site) == 0
    assert "no daemon runs on" in capsys.readouterr().err
    assert run("daemon", "--once", "--config", site) == 0
    with _opened(state) as store:
        ended = [record for record in store.recent() if not record.active]
    assert len(ended) == 1
    assert ended[0].outcome == Outcome(100, "Killed by operator", OutcomeSource.OPERATOR)


def test_daemon_dry_run_prints_what_would_start_and_starts_nothing(
    site: Path,
    state: Path,
    daemon_sandbox: list[tuple[int, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run("daemon", "--dry-run", "--config", site) == 0
    out = capsys.readouterr().out
    assert out.startswith("would start quick with 1 processors (")
    assert len(out.splitlines()) == 1
    assert daemon_sandbox == []  # no handlers: it does not run
    assert not (state / "fake-engine").exists()
    assert run("ps", "-q", "-a", "--config", site) == 0
    assert capsys.readouterr().out == ""


def test_daemon_dry_run_when_nothing_can_start(
    site: Path,
    state: Path,
    store: Store,
    daemon_sandbox: list[tuple[int, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    store.insert(lm(state, "vac01-00.example.com", 0))
    assert run("daemon", "--dry-run", "--config", site) == 0
    assert capsys.readouterr().out == "nothing would start: all 1 processors in use\n"


def test_daemon_dry_run_honours_drain(
    site: Path,
    state: Path,
    store: Store,
    daemon_sandbox: list[tuple[int, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run("drain", "--config", site) == 0
    capsys.readouterr()
    assert run("daemon", "--dry-run", "--config", site) == 0
    assert capsys.readouterr().out == "nothing would start: draining\n"
    assert run("undrain", "--config", site) == 0
    capsys.readouterr()
    assert run("daemon", "--dry-run", "--config", site) == 0
    assert capsys.readouterr().out.startswith("would start quick")


def test_daemon_once_starts_nothing_while_drained(
    site: Path,
    state: Path,
    store: Store,
    daemon_sandbox: list[tuple[int, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run("drain", "--config", site) == 0
    assert run("daemon", "--once", "--config", site) == 0
    assert store.active() == []


def test_daemon_with_a_bad_configuration_fails(
    tmp_path: Path, daemon_sandbox: list[tuple[int, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "lmrunner.yaml"
    path.write_text("factory:\n  space: space.example.com\n  total_procesors: 1\n")
    assert run("daemon", "--once", "--config", path) == 1
    assert "total_procesors: unknown key" in capsys.readouterr().err
    assert daemon_sandbox == []


# --- the command line itself -----------------------------------------------------------------


def listed_commands(help_text: str) -> list[str]:
    """The subcommands an argparse help text lists (indented under COMMAND)."""
    return re.findall(r"^    (\S+)", help_text, re.MULTILINE)


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    assert listed_commands(capsys.readouterr().out) == list(COMMANDS)


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert "COMMAND" in capsys.readouterr().out


def _recording(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    original: Callable[..., ModuleType] = importlib.import_module

    def record(name: str, package: str | None = None) -> ModuleType:
        calls.append(name)
        return original(name, package)

    monkeypatch.setattr(importlib, "import_module", record)
    return calls


@pytest.mark.parametrize(
    ("command", "module"),
    [
        ("ps", "ps"),
        ("stop", "control"),
        ("logs", "control"),
        ("daemon", "daemon"),
        ("check", "check"),
    ],
)
def test_build_parser_imports_only_the_module_of_the_command(
    command: str, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _recording(monkeypatch)
    parser = build_parser(command)
    assert [name for name in calls if name.startswith("lmrunner.cli.")] == [
        f"lmrunner.cli.{module}"
    ]
    # The other commands are still known (and listed in --help).
    assert listed_commands(parser.format_help()) == list(COMMANDS)


def test_build_parser_without_a_command_imports_each_module_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _recording(monkeypatch)
    build_parser()
    modules = {f"lmrunner.cli.{module}" for module, _ in COMMANDS.values()}
    assert sorted(calls) == sorted(modules)


def test_running_ps_loads_only_the_ps_module(
    state: Path, store: Store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = _recording(monkeypatch)
    assert run("ps", "-a", "--json", "--state-dir", state) == 0
    assert calls == ["lmrunner.cli.ps"]


# --- machinetypes and the one-daemon lock --------------------------------------------------------


def test_machinetypes_shows_share_running_backoff_and_last_outcome(
    site: Path, state: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    store.insert(lm(state, "factory-00.example.com", 0))
    aborted = finished(state, "factory-01.example.com", 1)
    store.insert(
        replace(
            aborted,
            machinetype="quick",
            outcome=Outcome(300, "No more work", OutcomeSource.PAYLOAD),
            finished=time.time(),
        )
    )
    assert run("machinetypes", "--config", site, "--json") == 0
    document = json.loads(capsys.readouterr().out)
    assert document["schema"] == "lmrunner.machinetypes/1"
    quick = next(row for row in document["machinetypes"] if row["machinetype"] == "quick")
    assert (quick["running_lms"], quick["running_processors"]) == (1, 1)
    assert quick["startable"] is False
    assert quick["blocked"].startswith("backoff until ")
    assert quick["last_outcome"] == {"code": 300, "text": "No more work", "source": "payload"}
    assert run("machinetypes", "--config", site) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "MACHINETYPE",
        "BACKEND",
        "SHARE",
        "LMS",
        "PROCS",
        "HS06",
        "STARTABLE",
        "LAST",
        "OUTCOME",
    ]


def test_a_second_daemon_on_the_same_state_directory_is_refused(
    site: Path,
    state: Path,
    daemon_sandbox: list[tuple[int, Any]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lmrunner.cli.daemon import _exclusive

    state.mkdir(parents=True, exist_ok=True)
    held = _exclusive(state)
    try:
        assert run("daemon", "--config", site, "--once") == 1
        assert "another lmrunner daemon runs on this state directory" in capsys.readouterr().err
    finally:
        held.close()
    assert run("daemon", "--config", site, "--once") == 0
