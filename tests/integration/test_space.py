"""Factories of one space, each in its own network namespace on a bridge, see each other
through VacQuery: target shares hold across the space, and an abort on one backs its
machinetype off on all. The namespaces, the bridge (in a hub namespace of its own, away from
the host's firewall) and the daemons are made and removed by the test; the LMs are fake.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid as uuid_mod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmrunner.state import LmRecord, Store, StoreError
from tests.integration.conftest import REPO, TIMESCALE, remove_lms

pytestmark = pytest.mark.slow
PORT = 995


@dataclass
class Member:
    """One factory: its namespace, address, folder and daemon."""

    netns: str
    address: str
    top: Path
    daemon: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # factory options of a test

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
                [*self.inside, sys.executable, "-m", "lmrunner", "daemon", "--config",
                 str(self.config)],
                stderr=err, cwd=REPO,
            )  # fmt: skip

    @property
    def inside(self) -> list[str]:
        """Run in the namespace's network only: nsenter execs in place (signals reach the
        daemon) and, unlike ``ip netns exec``, keeps the host's /sys, so its cgroups (and
        Docker LMs) are there."""
        return ["nsenter", f"--net=/run/netns/{self.netns}"]

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
        try:
            store = Store(self.state, readonly=True)
        except StoreError:  # the daemon is making it (schema 0 for a moment): none yet
            return []
        try:
            return store.recent()
        finally:
            store.close()

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.inside, sys.executable, "-m", "lmrunner", *args, "--config",
             str(self.config)],
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
        for member in members:  # their LMs outlive them by design: not the test's
            if member.config.exists():
                with contextlib.suppress(Exception):
                    remove_lms(member.config)
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
    # Every LM of the space, once, from any factory; and the machinetypes summed over it.
    listed = space[3].cli("ps", "--space", "--json")
    assert listed.returncode == 0, listed.stderr
    lms = json.loads(listed.stdout)["lms"]
    mine = {r.uuid for m in space for r in m.records() if r.active}
    assert sorted(lm["uuid"] for lm in lms) == sorted(mine)
    assert {lm["factory"] for lm in lms} == set(everyone)
    assert all(lm["state"] == "Running" and lm["machine_model"] == "fake" for lm in lms)
    listed = space[1].cli("machinetypes", "--space", "--json")
    assert listed.returncode == 0, listed.stderr
    document = json.loads(listed.stdout)
    assert document["schema"] == "lmrunner.machinetypes.space/1"
    by_type = {row["machinetype"]: row for row in document["machinetypes"]}
    assert by_type["a"]["running_processors"] == counts.get("a", 0)
    assert by_type["b"]["running_processors"] == counts.get("b", 0)
    assert len(by_type["a"]["factories"]) == 5 and len(by_type["b"]["factories"]) == 3
    table = space[0].cli("ps", "--space")
    assert table.returncode == 0 and "5 of 5 factories answered" in table.stdout, table


def test_an_abort_on_one_factory_backs_the_type_off_on_all(space: list[Member]) -> None:
    ended = time.monotonic()
    _abort_then_undrain(space, None, 0)  # undrained one round after the 300
    for member in space[1:]:
        started = [r.machinetype for r in member.records()]
        assert "probe" not in started, (member.address, started)
    assert time.monotonic() - ended < 90 * TIMESCALE


def _drop_udp(member: Member, probability: float) -> None:
    """Lose this share of the UDP datagrams reaching the member (iptables' statistic match:
    this kernel has no netem), in its own namespace's firewall."""
    rule = ["INPUT", "-p", "udp"]
    if probability < 1:
        rule += ["-m", "statistic", "--mode", "random", "--probability", str(probability)]
    subprocess.run([*member.inside, "iptables", "-A", *rule, "-j", "DROP"], check=True)


def _log_has(member: Member, text: str) -> bool:
    return member.log.exists() and text in member.log.read_text()


def _abort_then_undrain(space: list[Member], wait_text: str | None, timeout: float) -> None:
    """The first factory's probe ends with a 300; once the others saw it (``wait_text`` in
    their logs, or a round's time), they are undrained and fill."""
    everyone = [m.address for m in space]
    probe = {"backend": "fake", "image": "fake:seconds=1;message=300 No more work",
             "target_share": 1, "backoff_seconds": 3600, "fizzle_seconds": 0}  # fmt: skip
    filler = {**LONG, "target_share": 1}
    for member in space[1:]:
        member.write(everyone, {"probe": probe, "filler": filler}, draining=True,
                     **member.extra)  # fmt: skip
        member.start()
    space[0].write(everyone, {"probe": probe}, total_processors=1, **space[0].extra)
    space[0].start()
    wait_for("the probe's 300 on the first factory", lambda: any(
        r.outcome is not None and r.outcome.code == 300 for r in space[0].records()
    ), 30, space)  # fmt: skip
    if wait_text is None:
        time.sleep(8)
    else:
        wait_for("the others see the abort", lambda: all(
            _log_has(m, wait_text) for m in space[1:]), timeout, space)  # fmt: skip
    for member in space[1:]:
        member.write(everyone, {"probe": probe, "filler": filler}, **member.extra)
        assert member.daemon is not None
        member.daemon.send_signal(signal.SIGHUP)
    wait_for("the others full", lambda: all(
        sum(r.processors for r in m.records() if r.active) == 2 for m in space[1:]
    ), 60, space)  # fmt: skip


def test_with_half_the_datagrams_lost_an_abort_still_reaches_every_factory(
    space: list[Member],
) -> None:
    """50 % of the UDP datagrams into every factory are dropped: retransmission (only to the
    factories still owing replies) and rounds every few seconds still bring the first
    factory's 300 to all the others, which then start none of that machinetype."""
    for member in space:
        _drop_udp(member, 0.5)
    aborted = f"space: machinetype probe aborted on {space[0].address}"
    _abort_then_undrain(space, aborted, 90)
    for member in space[1:]:
        started = [r.machinetype for r in member.records()]
        assert "probe" not in started, (member.address, started)
        assert "Traceback" not in member.log.read_text()


def test_a_partitioned_factory_costs_the_others_at_most_the_deadline(
    space: list[Member],
) -> None:
    """The fifth factory is named in the space but its datagrams are all dropped: the others
    start (their first pass waits for one round, at most udp_timeout_seconds) and fill as fast
    as alone; their later passes do not wait for it at all (the space is asked beside the
    loop), and they say once that it does not answer."""
    everyone = [m.address for m in space]
    _drop_udp(space[4], 1.0)
    short = {"backend": "fake", "image": "fake:seconds=1;message=200 Done", "target_share": 1,
             "fizzle_seconds": 0}  # fmt: skip
    for member in space[:4]:
        member.write(everyone, {"short": short}, udp_timeout_seconds=3)
    started = time.monotonic()
    for member in space[:4]:
        member.start()
    wait_for(
        "every reachable factory starts LMs",
        lambda: all(any(r.machinetype == "short" for r in m.records()) for m in space[:4]),
        30,
        space,
    )
    first_start = time.monotonic() - started
    assert first_start < 3 + 5 * TIMESCALE, first_start  # one round's deadline + start-up
    # 1-second LMs, one after another in each slot: a pass that waited for the silent
    # factory (3 s a round) could not keep up with them.
    time.sleep(12)
    for member in space[:4]:
        ended = [r for r in member.records() if r.outcome is not None]
        assert len(ended) >= 2 * 6, (member.address, len(ended))  # 2 slots, >= 6 LMs each
        log = member.log.read_text()
        assert log.count(f"space: no answer from {space[4].address}") == 1, log[-2000:]
    listed = space[0].cli("factories", "--json", "--timeout", "2")
    rows = {row["factory"]: row["answered"] for row in json.loads(listed.stdout)["factories"]}
    assert rows == {**dict.fromkeys(everyone[:4], True), space[4].address: False}
    assert json.loads(listed.stdout)["seconds"] <= 2.5


def test_a_signed_space_ignores_unsigned_news_and_lets_vac_read_one_factory(
    space: list[Member], tmp_path: Path
) -> None:
    """Four factories share a secret; the fifth has none (a Vac factory, or an intruder). Its
    probe's 300 would back the type off everywhere in a plain space: here the others start
    the probe all the same, because unsigned replies never change a decision. The factory with
    ``space_answer_vac`` answers the fifth's plain queries (read-only); the others do not."""
    secret = tmp_path / "space.secret"
    secret.write_text("0123456789abcdef0123456789abcdef\n")
    secret.chmod(0o600)
    outsider, signed = space[0], space[1:]
    for member in signed:
        member.extra = {"space_secret_file": str(secret)}
    signed[0].extra["space_answer_vac"] = True
    _abort_then_undrain(space, None, 0)
    for member in signed:
        assert "probe" in [r.machinetype for r in member.records()], member.address
        assert f"machinetype probe aborted on {outsider.address}" not in member.log.read_text()
    seen = json.loads(outsider.cli("factories", "--json", "--timeout", "2").stdout)
    answered = {row["factory"]: row["answered"] for row in seen["factories"]}
    assert answered == {outsider.address: True, signed[0].address: True,
                        **{m.address: False for m in signed[1:]}}  # fmt: skip
    seen = json.loads(signed[2].cli("factories", "--json", "--timeout", "2").stdout)
    by_name = {row["factory"]: row for row in seen["factories"]}
    assert all(by_name[m.address]["signed"] for m in signed)
    # Inspection shows the unsigned factory, marked so; planning never used it.
    assert by_name[outsider.address]["answered"] and not by_name[outsider.address]["signed"]


@pytest.mark.docker
def test_restarted_factories_adopt_their_lms_and_the_space_lists_each_once(
    space: list[Member], docker_client: Any, vcbusybox: Path
) -> None:
    """One factory runs Docker LMs, four fake ones. Every daemon is stopped and started
    again: each adopts what it ran (no new LM, none lost), and ``ps --space`` lists every LM
    of the space exactly once, the Docker ones as ``docker``."""
    everyone = [m.address for m in space]
    user_data = space[0].top / "user_data"
    user_data.write_text("#!/bin/sh\nsleep 3600\n")
    space[0].write(everyone, {"dc": {"backend": "docker", "image": "docker://vcbusybox:latest",
                                     "user_data": str(user_data), "target_share": 1,
                                     "fizzle_seconds": 0, "stop_grace_seconds": 2}},
                   disk_gb_per_processor=0.05)  # fmt: skip
    for member in space[1:]:
        member.write(everyone, {"a": {**LONG, "target_share": 1}})
    for member in space:
        member.start()
    wait_for(
        "every factory full",
        lambda: all(sum(r.processors for r in m.records() if r.active) == 2 for m in space),
        90,
        space,
    )
    before = {m.address: sorted(r.uuid for r in m.records()) for m in space}
    for member in space:
        member.stop()
    for member in space:
        member.start()
    wait_for("every factory answers again", lambda: all(
        _log_has(m, "vacquery: answering") and m.log.read_text().count("vacquery: answering")
        == 2 for m in space), 60, space)  # fmt: skip
    time.sleep(3)  # a few passes: any duplicate start would show now
    after = {m.address: sorted(r.uuid for r in m.records()) for m in space}
    assert after == before
    listed = json.loads(space[2].cli("ps", "--space", "--json").stdout)
    uuids = [lm["uuid"] for lm in listed["lms"]]
    assert sorted(uuids) == sorted(u for got in before.values() for u in got)
    assert len(set(uuids)) == len(uuids) == 2 + 4 * 2
    models = {lm["machine_model"] for lm in listed["lms"] if lm["factory"] == space[0].address}
    assert models == {"docker"}
