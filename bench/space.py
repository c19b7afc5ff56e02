#!/usr/bin/env python3
"""Space benchmark: a VacQuery round at N factories, and what the space costs a factory's pass.

Query rounds: one helper process simulates up to 500 factories with a selector over one UDP
socket per factory, each bound to its own loopback address (127.77.X.Y) on one common port and
answering with lmrunner's own replies (``replies.machinetypes``/``machines``/``factory_status``,
from a Facts of 3 machinetypes, 8 slots and a few running fake LMs, built once per factory as
the real responder's snapshot is). The client is lmrunner's ``client.query``, in this process;
the responders run on the other core, so their work overlaps the client's as on a real space.
For each query type, ``--repeat`` rounds to each N (default 10, 100, 500; the N in turn, after
a warm-up round each), medians of:
  - ``seconds`` (``Answers.seconds``: the round ends when every factory gave all it announced,
    so this is the work, not the timeout), ``ms_per_factory``;
  - datagrams and bytes sent and received (``bytes_per_factory``: received / N), factories
    answered and complete, datagrams retransmitted (sent - N: a loss costs ``timeout / tries``
    of silence, 2 s at lmrunner's default ``udp_timeout_seconds``);
  - ``client_cpu_ms`` (this process: the client alone) and ``responder_cpu_ms`` (the simulated
    responders, all N together).
Linearity: ``ms_per_factory`` at the largest N / at the smallest, and the marginal cost per
added factory over the last interval / over the first, of the round's time and of the client's
CPU (``marginal_ratio``, ``client_cpu_marginal_ratio``: fixed costs do not hide a quadratic term
there; the CPU figure is the steadier on a busy host); ``bytes_ratio``: bytes per factory at the
largest N / at the smallest.

Pass cost: as bench/core.py, a factory full of ``--lms`` running fake LMs; ``run_pass()`` timed
(median of ``--passes``, interleaved) with ``space=lambda: None`` and with ``space=lambda:
view``, ``view`` aggregated from a real machinetypes round of 100 simulated factories; the same
for ``Factory.plan()`` with 8 processors free (the planner then ranks with the space's sums).
``pass_ms_space100_live``: passes while lmrunner's own SpaceWatch asks the 100 factories round
after round with no rest (its worst case; the daemon rests PERIOD_SECONDS between rounds).

Targets (issue): growth linear in N (here: the round's ``marginal_ratio`` <= 1.5 and bytes per
factory constant), and a pass with the space at 100 factories <= 2 x the pass without
(``ratio``); ``targets`` in the JSON says which were met. The last line of stdout is one JSON
object with every figure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import selectors
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from core import CONFIG as FACTORY_CONFIG
from core import fill

from lmrunner.backends.base import Handle
from lmrunner.backends.fake import FakeBackend
from lmrunner.config import Config
from lmrunner.factory import Factory, Tuning
from lmrunner.lifecycle import LmState, Outcome, OutcomeSource
from lmrunner.loader import load_config
from lmrunner.model import Limits
from lmrunner.payload import lm_name
from lmrunner.state import LmRecord, Store
from lmrunner.vacquery import client, protocol, replies
from lmrunner.vacquery.responder import Responder
from lmrunner.vacquery.space import SpaceView, SpaceWatch, aggregate

SPACE = "space.bench.example.com"
#: The simulated factories' configuration (their hostnames are set one by one).
RESPONDER_CONFIG = """\
factory:
  space: {space}
  hostname: bench.example.com
  state_dir: {state}
  total_processors: 8
machinetypes:
  a: {{backend: fake, image: "fake:seconds=86000", target_share: 1}}
  b: {{backend: fake, image: "fake:seconds=86000", target_share: 2}}
  c: {{backend: fake, image: "fake:seconds=86000", target_share: 1, fizzle_seconds: 600}}
"""
KINDS = (protocol.MACHINETYPES_QUERY, protocol.MACHINES_QUERY, protocol.FACTORY_QUERY)
#: The factories of the space whose view the pass gets.
SPACE_FACTORIES = 100
#: Processors left free for the plan() figures.
FREE = 8


def factory_names(count: int) -> tuple[list[str], dict[str, str]]:
    """``count`` factory names and the loopback address each answers on."""
    names = [f"f{index:03d}.{SPACE}" for index in range(count)]
    addresses = {name: f"127.77.{index // 250}.{index % 250 + 1}" for index, name in
                 enumerate(names)}  # fmt: skip
    return names, addresses


def facts_for(config: Config, hostname: str, index: int, now: float) -> replies.Facts:
    """One simulated factory: 2-6 running LMs over a, b and c, some before fizzle; the last LM
    of c ended with an abort on every tenth factory."""
    config = replace(config, factory=replace(config.factory, hostname=hostname))
    limits = Limits(processors=1, memory_bytes=2 << 30, swap_bytes=0, disk_bytes=40 * 10**9,
                    hs06=10.0)  # fmt: skip
    directory = config.factory.state_dir / "machines"
    active = []
    for slot in range(2 + index % 5):
        started = now - (index * 37 + slot * 600) % 7200
        active.append(LmRecord(
            uuid=f"00000000-0000-4000-8000-{index:06d}{slot:06d}", name=lm_name(hostname, slot),
            machinetype="abc"[slot % 3], backend="fake", slot=slot, processors=1, limits=limits,
            hs06=10.0, shutdown_time=int(now) + 86400, directory=directory, created=started,
            state=LmState.RUNNING, started=started, handle=Handle(1, {}),
        ))  # fmt: skip
    code, text = (300, "Nothing to do") if index % 10 == 0 else (200, "Success")
    ended = replace(
        active[0], uuid=f"00000000-0000-4000-8000-{index:06d}999999", machinetype="c",
        name=lm_name(hostname, 7), slot=7, state=LmState.FINISHED, finished=now - index,
        outcome=Outcome(code, text, OutcomeSource.PAYLOAD),
    )  # fmt: skip
    return replies.Facts(config, active, {"c": ended}, now)


def bind_all(addresses: Sequence[str]) -> tuple[int, list[socket.socket]]:
    """One UDP socket per address, all on one port (free on the first address, tried on the
    others; another port when one of them has it taken)."""
    for _ in range(20):
        socks: list[socket.socket] = []
        port = 0
        try:
            for address in addresses:
                socks.append(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                socks[-1].bind((address, port))
                port = socks[-1].getsockname()[1]
                socks[-1].setblocking(False)
        except OSError:
            for sock in socks:
                sock.close()
            continue
        return port, socks
    raise OSError("no port free on every simulated factory's address")


def serve(
    config: Config, names: Sequence[str], addresses: dict[str, str], conn: Connection
) -> None:
    """The simulated factories (a process of their own): answer every request until "stop";
    "stats" returns (CPU seconds, requests answered, datagrams and bytes sent)."""
    now = time.time()
    port, socks = bind_all([addresses[name] for name in names])
    selector = selectors.DefaultSelector()
    for index, (name, sock) in enumerate(zip(names, socks, strict=True)):
        selector.register(sock, selectors.EVENT_READ, (sock, facts_for(config, name, index, now)))
    selector.register(conn, selectors.EVENT_READ, None)
    conn.send(port)
    answered = datagrams = sent_bytes = 0
    while True:
        for key, _ in selector.select():
            if key.data is None:
                if conn.recv() == "stop":
                    return
                conn.send((time.process_time(), answered, datagrams, sent_bytes))
                continue
            sock, facts = key.data
            while True:
                try:
                    data, source = sock.recvfrom(protocol.REQUEST_LIMIT + 1)
                except BlockingIOError:
                    break
                for reply in Responder.answer_to(facts, protocol.parse_request(data)):
                    datagram = protocol.encode(reply)
                    sock.sendto(datagram, source)
                    datagrams += 1
                    sent_bytes += len(datagram)
                answered += 1


class Responders:
    """The helper process and a line to it."""

    def __init__(self, config: Config, names: Sequence[str], addresses: dict[str, str]) -> None:
        context = multiprocessing.get_context("fork")  # nothing but this thread runs yet
        self.conn, theirs = context.Pipe()
        self.process = context.Process(target=serve, args=(config, names, addresses, theirs),
                                       name="responders", daemon=True)  # fmt: skip
        self.process.start()
        theirs.close()
        if not self.conn.poll(60):
            raise RuntimeError("the simulated responders did not start")
        self.port: int = self.conn.recv()

    def stats(self) -> tuple[float, int, int, int]:
        self.conn.send("stats")
        cpu, answered, datagrams, sent_bytes = self.conn.recv()
        return float(cpu), int(answered), int(datagrams), int(sent_bytes)

    def close(self) -> None:
        self.conn.send("stop")
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def rounds(
    kind: str, counts: Sequence[int], repeat: int, responders: Responders,
    addresses: dict[str, str], timeout: float,
) -> dict[int, dict[str, float]]:  # fmt: skip
    """Median figures of ``repeat`` rounds to the first N factories for each N of ``counts``
    (after a warm-up; the N taken in turn, so that a slower moment of the host hits them all)."""
    samples: dict[int, list[dict[str, float]]] = {count: [] for count in counts}
    for step in range(repeat + 1):
        for count in counts:
            names = sorted(addresses)[:count]
            before, cpu_before = responders.stats()[0], time.process_time()
            answers = client.query(kind, names, SPACE, port=responders.port, timeout=timeout,
                                   client="bench", resolve=addresses.__getitem__)  # fmt: skip
            cpu = time.process_time() - cpu_before
            responder_cpu = responders.stats()[0] - before
            if step == 0:
                continue  # the warm-up round
            samples[count].append({
                "seconds": answers.seconds, "sent": answers.sent,
                "sent_bytes": answers.sent_bytes, "received": answers.received,
                "received_bytes": answers.received_bytes, "answered": len(answers.answered()),
                "complete": sum(answers.complete(name) for name in names),
                "dropped": answers.dropped, "client_cpu_ms": cpu * 1000,
                "responder_cpu_ms": responder_cpu * 1000,
            })  # fmt: skip
    return {count: summary(count, samples[count]) for count in counts}


def summary(count: int, samples: list[dict[str, float]]) -> dict[str, float]:
    figures = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    figures["round_ms"] = figures["seconds"] * 1000
    figures["ms_per_factory"] = figures["round_ms"] / count
    figures["client_cpu_ms_per_factory"] = figures["client_cpu_ms"] / count
    figures["bytes_per_factory"] = figures["received_bytes"] / count
    figures["replies_per_factory"] = figures["received"] / count
    figures["seconds_max"] = max(s["seconds"] for s in samples)
    figures["answered_min"] = min(s["answered"] for s in samples)
    figures["complete_min"] = min(s["complete"] for s in samples)
    figures["retransmitted_max"] = max(s["sent"] for s in samples) - count
    return figures


def describe(kind: str, count: int, f: dict[str, float]) -> str:
    return (
        f"{kind} {count} factories: {f['seconds'] * 1000:.1f} ms "
        f"({f['ms_per_factory']:.3f} ms/factory; slowest {f['seconds_max'] * 1000:.1f} ms), "
        f"sent {f['sent']:.0f} datagrams {f['sent_bytes']:.0f} B, received "
        f"{f['received']:.0f} datagrams {f['received_bytes']:.0f} B "
        f"({f['bytes_per_factory']:.0f} B/factory), complete {f['complete_min']:.0f}/{count}, "
        f"retransmitted {f['retransmitted_max']:.0f}, CPU {f['client_cpu_ms']:.1f} ms client, "
        f"{f['responder_cpu_ms']:.1f} ms responders"
    )


def marginal(by_count: dict[int, dict[str, float]], low: int, high: int, key: str) -> float:
    """Milliseconds each factory added between ``low`` and ``high`` factories costs."""
    return (by_count[high][key] - by_count[low][key]) / (high - low)


def linearity(by_count: dict[int, dict[str, float]]) -> dict[str, float]:
    counts = sorted(by_count)
    low, high = by_count[counts[0]], by_count[counts[-1]]
    out = {
        "ms_per_factory_ratio": high["ms_per_factory"] / low["ms_per_factory"],
        "bytes_ratio": high["bytes_per_factory"] / low["bytes_per_factory"],
    }
    if len(counts) >= 3:
        for name, key in (("", "round_ms"), ("client_cpu_", "client_cpu_ms")):
            first = marginal(by_count, counts[0], counts[1], key)
            last = marginal(by_count, counts[-2], counts[-1], key)
            out[f"{name}marginal_ms_first"], out[f"{name}marginal_ms_last"] = first, last
            out[f"{name}marginal_ratio"] = last / first if first > 0 else float("inf")
    return out


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return (time.perf_counter() - started) * 1000


def pass_cost(
    lms: int, passes: int, view: SpaceView, watch_config: Callable[[Config], Config],
    resolve: Callable[[str], str], requests: Callable[[], int],
) -> dict[str, float]:  # fmt: skip
    """run_pass() and plan() with and without the view of the space, and run_pass() beside a
    live SpaceWatch."""
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        config_file = Path(tmp) / "lmrunner.yaml"
        config_file.write_text(FACTORY_CONFIG.format(state=state))
        config = load_config(config_file, cpus=1)
        config = replace(config, factory=replace(config.factory, total_processors=lms))
        fill(state, lms)
        store = Store(state)
        backend = FakeBackend(state / "fake-engine")
        factory = Factory(config, store, {"fake": backend}, tuning=Tuning(reconcile_seconds=3600),
                          load_average=lambda: (0.0, 0.0, 0.0))  # fmt: skip
        alone: Callable[[], SpaceView | None] = lambda: None  # noqa: E731
        spaced: Callable[[], SpaceView | None] = lambda: view  # noqa: E731
        figures: dict[str, list[float]] = {"alone": [], "space": [], "plan_alone": [],
                                           "plan_space": [], "live": []}  # fmt: skip
        for _ in range(3):  # the first pass reconciles every LM; then steady passes
            factory.run_pass()
        for index in range(passes):
            order = [("alone", alone), ("space", spaced)]
            for key, space in order if index % 2 else reversed(order):
                factory.space = space
                figures[key].append(timed(factory.run_pass))
        # plan(): 8 processors free, so the planner ranks (the full factory stops at its gate).
        factory.config = replace(config, factory=replace(config.factory, total_processors=lms
                                                         + FREE))  # fmt: skip
        active = store.active()
        for index in range(passes):
            order = [("plan_alone", alone), ("plan_space", spaced)]
            for key, space in order if index % 2 else reversed(order):
                factory.space = space
                started = time.perf_counter()
                decisions = factory.plan(active, FREE)
                figures[key].append((time.perf_counter() - started) * 1000)
                assert isinstance(decisions, list) and len(decisions) == FREE, decisions
        factory.config = config
        # Beside lmrunner's SpaceWatch asking the 100 factories without rest (worst case).
        watch = SpaceWatch(lambda: watch_config(config), period=0.0, resolve=resolve).start()
        waited = time.monotonic() + 30
        while watch.view() is None and time.monotonic() < waited:
            time.sleep(0.01)
        factory.space = watch.view
        asked = requests()
        started = time.monotonic()
        try:
            for _ in range(passes):
                figures["live"].append(timed(factory.run_pass))
                time.sleep(0.002)  # as between the daemon's passes: the watch thread runs too
        finally:
            elapsed = time.monotonic() - started
            view_live = watch.view()
            watch.close()
        live_rounds = (requests() - asked) / SPACE_FACTORIES
        factory.close()
        store.close()
    medians = {key: statistics.median(values) for key, values in figures.items()}
    return {
        "pass_ms_alone": medians["alone"],
        "pass_ms_space100": medians["space"],
        "ratio": medians["space"] / medians["alone"],
        "plan_ms_alone": medians["plan_alone"],
        "plan_ms_space100": medians["plan_space"],
        "plan_ratio": medians["plan_space"] / medians["plan_alone"],
        "pass_ms_space100_live": medians["live"],
        "ratio_live": medians["live"] / medians["alone"],
        "live_seconds": elapsed,
        "live_rounds": live_rounds,
        "live_view_factories": float(len(view_live.answered)) if view_live else 0.0,
        "live_view_round_ms": view_live.seconds * 1000 if view_live else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--repeat", type=int, default=15, help="query rounds per figure")
    parser.add_argument("--passes", type=int, default=51, help="passes per figure")
    parser.add_argument("--lms", type=int, default=1000, help="running LMs of the pass")
    parser.add_argument("--timeout", type=float, default=10.0,
                        help="the rounds' udp_timeout_seconds (lmrunner's default)")  # fmt: skip
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    args = parser.parse_args()
    counts = sorted(set(args.counts))
    names, addresses = factory_names(max(*counts, SPACE_FACTORIES))
    space_names = names[:SPACE_FACTORIES]
    results: dict[str, Any] = {"rounds": {}, "linearity": {}}
    with tempfile.TemporaryDirectory() as tmp:
        config_file = Path(tmp) / "responder.yaml"
        config_file.write_text(RESPONDER_CONFIG.format(space=SPACE, state=Path(tmp) / "state"))
        responders = Responders(load_config(config_file, cpus=8), names, addresses)
        try:
            for kind in args.kinds:
                by_count = rounds(kind, counts, args.repeat, responders, addresses, args.timeout)
                for count in counts:
                    print(describe(kind, count, by_count[count]), flush=True)
                results["rounds"][kind] = {str(n): f for n, f in by_count.items()}
                if len(counts) >= 2:
                    line = results["linearity"][kind] = linearity(by_count)
                    figures = ", ".join(f"{k} {v:.2f}" for k, v in line.items())
                    print(f"{kind} linearity: {figures}", flush=True)
            # The view a factory plans with in a space of 100 others: from a real round.
            answers = client.query(protocol.MACHINETYPES_QUERY, space_names, SPACE,
                                   port=responders.port, timeout=args.timeout,
                                   resolve=addresses.__getitem__)  # fmt: skip
            view = aggregate(answers, time.time())
            assert len(view.answered) == SPACE_FACTORIES, view.silent

            def watch_config(mine: Config) -> Config:
                factory = replace(mine.factory, space=SPACE, factories=(".", *space_names),
                                  vacquery_port=responders.port,
                                  udp_timeout_seconds=args.timeout)  # fmt: skip
                return replace(mine, factory=factory)

            def requests() -> int:
                return responders.stats()[1]

            p = pass_cost(args.lms, args.passes, view, watch_config, addresses.__getitem__,
                          requests)  # fmt: skip
        finally:
            responders.close()
    results["pass"] = p
    print(f"pass at {args.lms} LMs: {p['pass_ms_alone']:.2f} ms alone, "
          f"{p['pass_ms_space100']:.2f} ms with the view of {SPACE_FACTORIES} factories "
          f"(ratio {p['ratio']:.2f}); plan() {p['plan_ms_alone']:.2f} / "
          f"{p['plan_ms_space100']:.2f} ms (ratio {p['plan_ratio']:.2f}); beside a SpaceWatch "
          f"without rest ({p['live_rounds']:.0f} rounds of {p['live_view_round_ms']:.1f} ms) "
          f"{p['pass_ms_space100_live']:.2f} ms (ratio {p['ratio_live']:.2f})")  # fmt: skip
    results["targets"] = {
        "pass_ratio_le_2": p["ratio"] <= 2.0,
        **{
            f"linear_{kind}": line.get("marginal_ratio", 0.0) <= 1.5
            and abs(line["bytes_ratio"] - 1.0) <= 0.05
            for kind, line in results["linearity"].items()
        },
    }
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in
                                  results["targets"].items()))  # fmt: skip
    print(json.dumps({"benchmark": "space", "repeat": args.repeat, "passes": args.passes,
                      "timeout": args.timeout, "lms": args.lms, **results}))  # fmt: skip


if __name__ == "__main__":
    main()
