"""Factories of one space, each in its own network namespace on a bridge, see each other
through VacQuery: target shares hold across the space, and an abort on one backs its
machinetype off on all. The namespaces, the bridge (in a hub namespace of its own, away from
the host's firewall) and the daemons are made and removed by the test; the LMs are fake.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid as uuid_mod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmrunner.state import LmRecord, Store
from tests.integration.conftest import REPO, TIMESCALE

pytestmark = pytest.mark.slow
PORT = 995


@dataclass
class Member:
    """One factory: its namespace, address, folder and daemon."""

    netns: str
    address: str
    top: Path
    daemon: subprocess.Popen[bytes] | None = None

    @property
    def state(self) -> Path:
        return self.top / "state"

    @property
    def config(self) -> Path:
        return self.top / "lmrunner.yaml"

    @property
    def log(self) -> Path:
        return self.top / "daemon.log"

    def write(self, space: list[str], machinetypes: dict[str, Any], **factory: Any) -> None:
        document = {
            "factory": {
                "space": "space.example.com",
                "hostname": self.address,  # an IP literal: names without DNS
                "state_dir": str(self.state),
                "total_processors": 2,  # at most this host's CPUs
                "overload_per_processor": 1000,
                "disk_method": "none",
                "factories": space,
                "udp_timeout_seconds": 2,
                "vacquery_port": PORT,
                **factory,
            },
            "machinetypes": machinetypes,
        }
        self.config.write_text(yaml.safe_dump(document))

    def start(self) -> None:
        with self.log.open("ab") as err:
            self.daemon = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-m", "lmrunner", "daemon",
                 "--config", str(self.config)],
                stderr=err, cwd=REPO,
            )  # fmt: skip

    def stop(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()

    def records(self) -> list[LmRecord]:
        if not (self.state / "lmrunner.db").exists():
            return []
        store = Store(self.state, readonly=True)
        try:
            return store.recent()
        finally:
            store.close()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, sys.executable, "-m", "lmrunner", *args,
             "--config", str(self.config)],
            capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
        )  # fmt: skip


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def space(tmp_path: Path) -> Iterator[list[Member]]:
    """Five namespaces on one bridge: 10.231.x.1 to .5."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    tag = uuid_mod.uuid4().hex[:6]
    hub = f"lmr-hub-{tag}"
    net = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
    members: list[Member] = []
    _ip("netns", "add", hub)
    try:
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "link", "set", "br0", "up")
        for index in range(1, 6):
            name = f"lmr-{tag}-{index}"
            _ip("netns", "add", name)
            _ip("-n", hub, "link", "add", f"p{index}", "type", "veth", "peer", "name", "eth0",
                "netns", name)  # fmt: skip
            _ip("-n", hub, "link", "set", f"p{index}", "master", "br0", "up")
            _ip("-n", name, "addr", "add", f"{net}.{index}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            top = tmp_path / f"f{index}"
            top.mkdir()
            members.append(Member(name, f"{net}.{index}", top))
        yield members
    finally:
        for member in members:
            member.stop()
        for member in members:
            subprocess.run(["ip", "netns", "del", member.netns], check=False)
        subprocess.run(["ip", "netns", "del", hub], check=False)


def running_by_type(members: list[Member]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for member in members:
        for record in member.records():
            if record.active:
                counts[record.machinetype] = counts.get(record.machinetype, 0) + record.processors
    return counts


def wait_for(what: str, condition: Any, timeout: float, members: list[Member]) -> None:
    deadline = time.monotonic() + timeout * TIMESCALE
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    logs = "\n".join(
        f"--- {m.address}\n{m.log.read_text()[-3000:]}" for m in members if m.log.exists()
    )
    raise AssertionError(f"not within {timeout} s: {what}\n{logs}")


LONG = {"backend": "fake", "image": "fake:seconds=3600", "fizzle_seconds": 0}


def test_target_shares_hold_across_the_space(space: list[Member]) -> None:
    """Two factories run only ``a``; three run ``a`` and ``b`` at equal shares, filled one after
    another: seeing the first two, they give ``b`` the processors, so the space runs a and b
    half and half (Vac's scores, vac.md §3.4), where alone they would run them half and half
    each (a 7:3 space)."""
    everyone = [m.address for m in space]
    for member in space[:2]:
        member.write(everyone, {"a": {**LONG, "target_share": 1}})
    for member in space[2:]:
        member.write(everyone, {"a": {**LONG, "target_share": 1},
                                "b": {**LONG, "target_share": 1}})  # fmt: skip
    for member in space:
        member.start()
        wait_for(f"{member.address} full", lambda m=member: sum(
            r.processors for r in m.records() if r.active) == 2, 60, space)  # fmt: skip
    counts = running_by_type(space)
    assert counts.get("a", 0) + counts.get("b", 0) == 10
    assert abs(counts.get("b", 0) - 5) <= 1, counts  # within 10 % of the space's 10
    listed = space[0].cli("factories", "--json")
    assert listed.returncode == 0, listed.stderr
    document = json.loads(listed.stdout)
    assert [f["answered"] for f in document["factories"]] == [True] * 5
    assert sum(f["status"]["running_processors"] for f in document["factories"]) == 10


def test_an_abort_on_one_factory_backs_the_type_off_on_all(space: list[Member]) -> None:
    everyone = [m.address for m in space]
    probe = {"backend": "fake", "image": "fake:seconds=1;message=300 No more work",
             "target_share": 1, "backoff_seconds": 3600, "fizzle_seconds": 0}  # fmt: skip
    filler = {**LONG, "target_share": 1}
    space[0].write(everyone, {"probe": probe}, total_processors=1)
    for member in space[1:]:  # running, but starting nothing until told
        member.write(everyone, {"probe": probe, "filler": filler}, draining=True)
    for member in space:
        member.start()
    wait_for("the probe's 300 on the first factory", lambda: any(
        r.outcome is not None and r.outcome.code == 300 for r in space[0].records()
    ), 30, space)  # fmt: skip
    ended = time.monotonic()
    time.sleep(8)  # one query round (every 5 s, each at most udp_timeout_seconds) has seen it
    for member in space[1:]:  # undrained: they plan with the space's news within one round
        member.write(everyone, {"probe": probe, "filler": filler})
        assert member.daemon is not None
        member.daemon.send_signal(signal.SIGHUP)  # `ip netns exec` ran the daemon in its place
    wait_for("the others full", lambda: all(
        sum(r.processors for r in m.records() if r.active) == 2 for m in space[1:]
    ), 60, space)  # fmt: skip
    for member in space[1:]:
        started = [r.machinetype for r in member.records()]
        assert "probe" not in started, (member.address, started)
    assert time.monotonic() - ended < 60 * TIMESCALE
