"""Prometheus metrics: the loop's counters (Metrics as an Observer), the scrape-time collector
over a real store, and the HTTP endpoint (/metrics, the status page, 404, HEAD, stalled
clients) on a real loopback socket. Exposition output is parsed with prometheus_client's own
parsers (text format and OpenMetrics)."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client import generate_latest
from prometheus_client.openmetrics import exposition as om_exposition
from prometheus_client.openmetrics import parser as om_parser
from prometheus_client.parser import text_string_to_metric_families

from lmrunner import metrics, serve
from lmrunner.config import Config
from lmrunner.errors import ConfigError
from lmrunner.lifecycle import LmState, Outcome, OutcomeSource
from lmrunner.metrics import Metrics, Sources
from lmrunner.serve import Endpoint, parse_listen
from lmrunner.state import LmRecord, Store
from lmrunner.statuspage import StatusPage
from lmrunner.vacquery.space import SpaceView, TypeInSpace
from tests.unit.test_factory import LONG, T0, Clock, Env, bare_record

Labels = frozenset[tuple[str, str]]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = Env(tmp_path)
    yield made
    made.close()


def make_config(env: Env, *, factory: Mapping[str, Any] | None = None, **alpha: Any) -> Config:
    """alpha (share 1, backoff 600 s) and beta (share 2, no LMs) on the fake backend, 2 cpus."""
    kind = {"backend": "fake", "image": LONG, "fizzle_seconds": 0}
    return env.config(
        cpus=2,
        factory={"disk_method": "none", **(factory or {})},
        machinetypes={
            "alpha": {**kind, "target_share": 1, "backoff_seconds": 600, **alpha},
            "beta": {**kind, "target_share": 2},
        },
    )


@pytest.fixture
def config(env: Env) -> Config:
    return make_config(env)


def lm(env: Env, slot: int, uuid: str, **changes: Any) -> LmRecord:
    return replace(bare_record(env, slot, uuid), **changes)


def ended(
    env: Env,
    slot: int,
    uuid: str,
    code: int | None,
    source: OutcomeSource = OutcomeSource.PAYLOAD,
    **changes: Any,
) -> LmRecord:
    outcome = None if code is None else Outcome(code, f"code {code}", source)
    values: dict[str, Any] = {
        "state": LmState.FINISHED,
        "started": T0 - 50,
        "finished": T0,
        "outcome": outcome,
        **changes,
    }
    return lm(env, slot, uuid, **values)


@dataclass
class Scrape:
    """One scrape, parsed: sample name and labels -> value; family name -> type."""

    samples: dict[tuple[str, Labels], float]
    types: dict[str, str]
    text: str

    def get(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))

    def value(self, name: str, **labels: str) -> float:
        got = self.get(name, **labels)
        assert got is not None, f"no sample {name}{labels} in:\n{self.text}"
        return got

    def named(self, name: str) -> dict[Labels, float]:
        return {labels: v for (n, labels), v in self.samples.items() if n == name}


def parse_text(text: str) -> Scrape:
    samples: dict[tuple[str, Labels], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, types, text)


def parse_openmetrics(text: str) -> Scrape:
    samples: dict[tuple[str, Labels], float] = {}
    types: dict[str, str] = {}
    for family in om_parser.text_string_to_metric_families(text):  # type: ignore[no-untyped-call]
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return Scrape(samples, types, text)


def scrape(made: Metrics) -> Scrape:
    return parse_text(generate_latest(made.registry).decode())


def settled(made: Metrics) -> Scrape:
    """A scrape after a first one: each configured machinetype's counters exist by then."""
    scrape(made)
    return scrape(made)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0 + 5)


def metrics_for(config: Config, clock: Callable[[], float], **sources: Any) -> Metrics:
    return Metrics(Sources(config=lambda: config, clock=clock, **sources))


# --- events from the loop ---------------------------------------------------------------------


def test_starts_are_counted_by_machinetype_and_backend(
    env: Env, config: Config, clock: Clock
) -> None:
    made = metrics_for(config, clock)
    made.started(lm(env, 0, "u0"))
    made.started(lm(env, 1, "u1"))
    made.started(lm(env, 0, "u2", machinetype="beta", backend="docker"))
    got = settled(made)
    assert got.types["lmrunner_lm_starts"] == "counter"
    assert got.value("lmrunner_lm_starts_total", machinetype="alpha", backend="fake") == 2
    assert got.value("lmrunner_lm_starts_total", machinetype="beta", backend="docker") == 1
    assert got.value("lmrunner_lm_starts_total", machinetype="beta", backend="fake") == 0
    assert len(got.named("lmrunner_lm_starts_total")) == 3


def test_ends_are_counted_by_code_and_source_with_cpu_seconds(
    env: Env, config: Config, clock: Clock
) -> None:
    made = metrics_for(config, clock)
    made.ended(ended(env, 0, "u0", 200, cpu_seconds=100.5))
    made.ended(ended(env, 1, "u1", 200, cpu_seconds=20.0))
    made.ended(ended(env, 0, "u2", 300, OutcomeSource.HEARTBEAT, cpu_seconds=None))
    made.ended(ended(env, 1, "u3", 500, OutcomeSource.WALLCLOCK, machinetype="beta"))
    got = settled(made)
    ends = "lmrunner_lm_ends_total"
    assert got.value(ends, machinetype="alpha", backend="fake", code="200", source="payload") == 2
    assert got.value(ends, machinetype="alpha", backend="fake", code="300", source="heartbeat") == 1
    assert got.value(ends, machinetype="beta", backend="fake", code="500", source="wallclock") == 1
    assert len(got.named(ends)) == 3
    assert got.value("lmrunner_lm_cpu_seconds_total", machinetype="alpha") == pytest.approx(120.5)
    assert got.value("lmrunner_lm_cpu_seconds_total", machinetype="beta") == 0
    assert set(got.named("lmrunner_lm_oom_kills_total").values()) == {0}


def test_an_end_without_an_outcome_has_empty_code_and_source(
    env: Env, config: Config, clock: Clock
) -> None:
    made = metrics_for(config, clock)
    made.ended(ended(env, 0, "u0", None, cpu_seconds=0.0))
    got = settled(made)
    labels = {"machinetype": "alpha", "backend": "fake", "code": "", "source": ""}
    assert got.value("lmrunner_lm_ends_total", **labels) == 1
    assert set(got.named("lmrunner_lm_cpu_seconds_total").values()) == {0}


def test_oom_kills_are_counted_by_their_source(env: Env, config: Config, clock: Clock) -> None:
    made = metrics_for(config, clock)
    made.ended(ended(env, 0, "u0", 500, OutcomeSource.OOM))
    made.ended(ended(env, 1, "u1", 500, OutcomeSource.OOM))
    made.ended(ended(env, 0, "u2", 500, OutcomeSource.EXIT_STATUS))  # no OOM
    made.ended(ended(env, 1, "u3", 200, OutcomeSource.OOM, machinetype="beta"))
    got = scrape(made)
    assert got.value("lmrunner_lm_oom_kills_total", machinetype="alpha") == 2
    assert got.value("lmrunner_lm_oom_kills_total", machinetype="beta") == 1
    ends = "lmrunner_lm_ends_total"
    assert got.value(ends, machinetype="alpha", backend="fake", code="500", source="oom") == 2


def test_passes_fill_the_histogram_and_the_last_pass_time(config: Config, clock: Clock) -> None:
    made = metrics_for(config, clock)
    got = scrape(made)
    assert got.value("lmrunner_pass_duration_seconds_count") == 0
    assert got.value("lmrunner_last_pass_timestamp_seconds") == 0
    before = time.time()
    made.passed(0.004, None)
    made.passed(0.2, None)
    made.passed(30.0, None)  # beyond the last bucket
    after = time.time()
    got = scrape(made)
    assert got.types["lmrunner_pass_duration_seconds"] == "histogram"
    assert got.value("lmrunner_pass_duration_seconds_count") == 3
    assert got.value("lmrunner_pass_duration_seconds_sum") == pytest.approx(30.204)
    assert got.value("lmrunner_pass_duration_seconds_bucket", le="0.005") == 1
    assert got.value("lmrunner_pass_duration_seconds_bucket", le="0.25") == 2
    assert got.value("lmrunner_pass_duration_seconds_bucket", le="10.0") == 2
    assert got.value("lmrunner_pass_duration_seconds_bucket", le="+Inf") == 3
    assert before <= got.value("lmrunner_last_pass_timestamp_seconds") <= after
    buckets = got.named("lmrunner_pass_duration_seconds_bucket")
    assert len(buckets) == len(metrics.PASS_BUCKETS) + 1


def test_a_blocked_state_directory_is_1_until_a_pass_is_not_blocked(
    config: Config, clock: Clock
) -> None:
    made = metrics_for(config, clock)
    assert scrape(made).value("lmrunner_state_dir_blocked") == 0
    made.passed(0.01, "the state directory is full")
    assert scrape(made).value("lmrunner_state_dir_blocked") == 1
    made.passed(0.01, "read-only filesystem")
    assert scrape(made).value("lmrunner_state_dir_blocked") == 1
    made.passed(0.01, None)
    assert scrape(made).value("lmrunner_state_dir_blocked") == 0


def test_reactions_fill_their_histogram(config: Config, clock: Clock) -> None:
    made = metrics_for(config, clock)
    made.reacted(0.003)
    made.reacted(0.7)
    got = scrape(made)
    assert got.value("lmrunner_event_reaction_seconds_count") == 2
    assert got.value("lmrunner_event_reaction_seconds_sum") == pytest.approx(0.703)
    assert got.value("lmrunner_event_reaction_seconds_bucket", le="0.005") == 1
    assert got.value("lmrunner_event_reaction_seconds_bucket", le="0.5") == 1
    assert got.value("lmrunner_event_reaction_seconds_bucket", le="1.0") == 2
    assert got.value("lmrunner_pass_duration_seconds_count") == 0  # a reaction is no pass


def test_configured_machinetypes_have_their_counters_at_0(env: Env, clock: Clock) -> None:
    holder = [make_config(env)]
    made = Metrics(Sources(config=lambda: holder[0], clock=clock))
    got = settled(made)
    for name in ("alpha", "beta"):
        assert got.value("lmrunner_lm_starts_total", machinetype=name, backend="fake") == 0
        assert got.value("lmrunner_lm_oom_kills_total", machinetype=name) == 0
        assert got.value("lmrunner_lm_cpu_seconds_total", machinetype=name) == 0
    assert got.named("lmrunner_lm_ends_total") == {}  # codes and sources are not known before
    kind = {"backend": "fake", "image": LONG, "target_share": 1}
    holder[0] = env.config(
        cpus=2, factory={"disk_method": "none"}, machinetypes={"gamma": kind}
    )  # a reload
    got = settled(made)
    assert got.value("lmrunner_lm_starts_total", machinetype="gamma", backend="fake") == 0
    assert got.value("lmrunner_lm_starts_total", machinetype="alpha", backend="fake") == 0


def test_configured_counters_are_0_in_the_very_first_scrape(config: Config, clock: Clock) -> None:
    got = scrape(metrics_for(config, clock))
    assert got.value("lmrunner_lm_starts_total", machinetype="alpha", backend="fake") == 0
    assert got.value("lmrunner_lm_oom_kills_total", machinetype="beta") == 0


# --- the collector: state at scrape time ------------------------------------------------------


def test_registering_does_not_scrape() -> None:
    def no_config() -> Config:
        raise AssertionError("the configuration was read at construction")

    made = Metrics(Sources(config=no_config))
    assert made.collector.scrapes == 0
    made.passed(0.1, None)
    made.reacted(0.1)
    assert made.collector.scrapes == 0


def test_lms_by_machinetype_backend_and_state_with_zero_rows(
    env: Env, config: Config, clock: Clock
) -> None:
    env.store.insert_many(
        [
            lm(env, 0, "u0", state=LmState.RUNNING, started=T0 - 10, processors=1),
            lm(env, 1, "u1", state=LmState.STARTING),
            ended(env, 2, "u2", 200),  # ended: not counted
        ]
    )
    made = metrics_for(config, clock)
    got = scrape(made)
    assert made.collector.scrapes == 1
    assert got.named("lmrunner_lms") == {
        frozenset({"machinetype": "alpha", "backend": "fake", "state": "running"}.items()): 1,
        frozenset({"machinetype": "alpha", "backend": "fake", "state": "starting"}.items()): 1,
        frozenset({"machinetype": "beta", "backend": "fake", "state": "running"}.items()): 0,
    }
    assert got.value("lmrunner_processors_used") == 2
    assert got.value("lmrunner_processors_total") == 2
    assert got.value("lmrunner_draining") == 0
    assert got.value("lmrunner_store_up") == 1
    assert got.value("lmrunner_machinetype_target_share", machinetype="alpha") == 1
    assert got.value("lmrunner_machinetype_target_share", machinetype="beta") == 2
    info = got.named("lmrunner_build_info")
    assert list(info.values()) == [1]
    assert {"version", "python"} == {key for key, _ in next(iter(info))}


def test_processors_used_counts_each_lms_processors(env: Env, clock: Clock) -> None:
    config = make_config(env, factory={"total_processors": 2})
    env.store.insert(lm(env, 0, "u0", state=LmState.RUNNING, started=T0, processors=2))
    got = scrape(metrics_for(config, clock))
    assert got.value("lmrunner_processors_used") == 2
    assert got.value("lmrunner_lms", machinetype="alpha", backend="fake", state="running") == 1


def test_draining_is_1_when_configured(env: Env, clock: Clock) -> None:
    config = make_config(env, factory={"draining": True})
    assert scrape(metrics_for(config, clock)).value("lmrunner_draining") == 1


def test_backoff_after_an_abort_until_backoff_seconds_passed(
    env: Env, config: Config, clock: Clock
) -> None:
    env.store.insert(ended(env, 0, "u0", 300, finished=T0))
    made = metrics_for(config, clock)
    clock.now = T0 + 5
    got = scrape(made)
    assert got.value("lmrunner_machinetype_backoff", machinetype="alpha") == 1
    assert got.value("lmrunner_machinetype_backoff", machinetype="beta") == 0
    assert got.named("lmrunner_machinetype_last_abort_timestamp_seconds") == {
        frozenset({("machinetype", "alpha")}): T0
    }
    clock.now = T0 + 599
    assert scrape(made).value("lmrunner_machinetype_backoff", machinetype="alpha") == 1
    clock.now = T0 + 600  # backoff_seconds 600
    assert scrape(made).value("lmrunner_machinetype_backoff", machinetype="alpha") == 0


def test_no_backoff_after_a_good_end(env: Env, config: Config, clock: Clock) -> None:
    env.store.insert_many(
        [
            ended(env, 0, "u0", 300, created=T0 - 200, finished=T0 - 100),
            ended(env, 1, "u1", 200, created=T0 - 60, finished=T0),  # the last one
        ]
    )
    got = scrape(metrics_for(config, clock))
    assert got.value("lmrunner_machinetype_backoff", machinetype="alpha") == 0
    assert got.get("lmrunner_machinetype_last_abort_timestamp_seconds", machinetype="alpha") is None


def test_backoff_from_an_abort_elsewhere_in_the_space(
    env: Env, config: Config, clock: Clock
) -> None:
    view = SpaceView(taken=T0, types={"beta": TypeInSpace(last_abort=T0 - 1)})
    got = scrape(metrics_for(config, clock, space=lambda: view))
    assert got.value("lmrunner_machinetype_backoff", machinetype="beta") == 1
    assert got.value("lmrunner_machinetype_backoff", machinetype="alpha") == 0
    last_abort = "lmrunner_machinetype_last_abort_timestamp_seconds"
    assert got.named(last_abort) == {frozenset({("machinetype", "beta")}): T0 - 1}


def test_engines_up_and_down(config: Config, clock: Clock) -> None:
    got = scrape(
        metrics_for(
            config,
            clock,
            backends=lambda: ["fake", "docker"],
            unavailable=lambda: {"docker": "cannot connect", "podman": "gone"},
        )
    )
    assert got.named("lmrunner_engine_up") == {
        frozenset({("backend", "docker")}): 0,
        frozenset({("backend", "fake")}): 1,
        frozenset({("backend", "podman")}): 0,
    }


def test_pipes_images_and_space(config: Config, clock: Clock) -> None:
    view = SpaceView(taken=T0 - 30, answered=("a", "b"), silent=("c",), seconds=1.5)
    got = scrape(
        metrics_for(
            config,
            clock,
            pipes=lambda: {"one": (12.0, 0), "two": (None, 3)},
            images=lambda: {"alpha": ("ready", 60.0), "beta": ("failed", None)},
            space=lambda: view,
        )
    )
    assert got.named("lmrunner_pipe_age_seconds") == {frozenset({("pipe", "one")}): 12}
    assert got.value("lmrunner_pipe_refresh_failures_total", pipe="one") == 0
    assert got.value("lmrunner_pipe_refresh_failures_total", pipe="two") == 3
    assert got.value("lmrunner_image_ready", machinetype="alpha", status="ready") == 1
    assert got.value("lmrunner_image_ready", machinetype="beta", status="failed") == 0
    assert got.named("lmrunner_image_age_seconds") == {frozenset({("machinetype", "alpha")}): 60}
    assert got.value("lmrunner_space_factories", answered="true") == 2
    assert got.value("lmrunner_space_factories", answered="false") == 1
    assert got.value("lmrunner_space_round_seconds") == 1.5
    assert got.value("lmrunner_space_view_age_seconds") == 35  # clock T0 + 5


def test_without_a_space_view_there_are_no_space_samples(config: Config, clock: Clock) -> None:
    got = scrape(metrics_for(config, clock))
    assert got.named("lmrunner_space_factories") == {}
    assert got.get("lmrunner_space_round_seconds") is None
    assert got.get("lmrunner_space_view_age_seconds") is None
    assert got.named("lmrunner_engine_up") == {}


def test_store_up_is_0_without_a_store_and_recovers(env: Env, clock: Clock) -> None:
    elsewhere = env.tmp_path / "other-state"
    elsewhere.mkdir()
    config = make_config(env, factory={"state_dir": str(elsewhere)})
    made = metrics_for(config, clock)
    got = scrape(made)
    assert got.value("lmrunner_store_up") == 0
    assert got.value("lmrunner_lms", machinetype="alpha", backend="fake", state="running") == 0
    assert got.named("lmrunner_machinetype_backoff") == {}
    assert got.named("lmrunner_machinetype_last_abort_timestamp_seconds") == {}
    assert got.value("lmrunner_processors_used") == 0
    assert not (elsewhere / "lmrunner.db").exists()  # a read-only scrape makes no store
    store = Store(elsewhere)
    try:
        store.insert(lm(env, 0, "u0", state=LmState.RUNNING, started=T0))
        got = scrape(made)
        assert got.value("lmrunner_store_up") == 1
        assert got.value("lmrunner_lms", machinetype="alpha", backend="fake", state="running") == 1
    finally:
        store.close()


def test_store_up_is_0_for_a_file_that_is_no_database(env: Env, clock: Clock) -> None:
    elsewhere = env.tmp_path / "garbled"
    elsewhere.mkdir()
    (elsewhere / "lmrunner.db").write_bytes(b"this is not an SQLite database" * 100)
    config = make_config(env, factory={"state_dir": str(elsewhere)})
    made = metrics_for(config, clock)
    assert scrape(made).value("lmrunner_store_up") == 0
    assert scrape(made).value("lmrunner_store_up") == 0  # and again, without a stale connection


def test_state_directory_bytes(config: Config, clock: Clock) -> None:
    got = scrape(metrics_for(config, clock))
    info = os.statvfs(config.factory.state_dir)
    assert got.value("lmrunner_state_dir_size_bytes") == info.f_blocks * info.f_frsize
    free = got.value("lmrunner_state_dir_free_bytes")
    assert 0 <= free <= got.value("lmrunner_state_dir_size_bytes")


def test_no_state_directory_bytes_when_it_is_missing(env: Env, clock: Clock) -> None:
    config = make_config(env, factory={"state_dir": str(env.tmp_path / "missing")})
    got = scrape(metrics_for(config, clock))
    assert got.get("lmrunner_state_dir_free_bytes") is None
    assert got.get("lmrunner_state_dir_size_bytes") is None
    assert got.value("lmrunner_store_up") == 0


def fake_cgroup(root: Path, usage_usec: int, memory: int) -> str:
    root.mkdir(parents=True)
    (root / "cpu.stat").write_text(f"usage_usec {usage_usec}\nuser_usec 1\nsystem_usec 1\n")
    (root / "memory.current").write_text(f"{memory}\n")
    return json.dumps({"version": 2, "name": root.name, "paths": {"unified": str(root)}})


def test_live_usage_of_running_lms_from_their_cgroups(
    env: Env, config: Config, clock: Clock
) -> None:
    cgroups = env.tmp_path / "cgroup"
    gone = {"version": 2, "name": "gone", "paths": {"unified": str(cgroups / "gone")}}
    running = LmState.RUNNING
    env.store.insert_many(
        [
            lm(env, 0, "u0", state=running, cgroup=fake_cgroup(cgroups / "a", 5_000_000, 1000)),
            lm(env, 1, "u1", state=running, cgroup=fake_cgroup(cgroups / "b", 2_500_000, 24)),
            lm(env, 2, "u2", state=running, cgroup="not json"),  # not measured
            lm(env, 3, "u3", state=running, cgroup=json.dumps(gone)),  # its cgroup is gone
            lm(env, 4, "u4", state=LmState.STARTING, machinetype="beta"),  # no cgroup yet
        ]
    )
    got = scrape(metrics_for(config, clock))
    assert got.named("lmrunner_running_cpu_seconds") == {frozenset({("machinetype", "alpha")}): 7.5}
    assert got.named("lmrunner_running_memory_bytes") == {
        frozenset({("machinetype", "alpha")}): 1024
    }


def test_openmetrics_exposition_parses(env: Env, config: Config, clock: Clock) -> None:
    made = metrics_for(config, clock)
    made.started(lm(env, 0, "u0"))
    text = om_exposition.generate_latest(made.registry).decode()  # type: ignore[no-untyped-call]
    assert text.endswith("# EOF\n")
    got = parse_openmetrics(text)
    assert got.value("lmrunner_lm_starts_total", machinetype="alpha", backend="fake") == 1
    assert got.value("lmrunner_store_up") == 1


# --- parse_listen -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9525", ("127.0.0.1", 9525)),
        ("localhost:1", ("localhost", 1)),
        ("metrics.example.com:65535", ("metrics.example.com", 65535)),
        ("[::1]:9525", ("::1", 9525)),
        ("[::]:80", ("::", 80)),
        (":9525", ("", 9525)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),  # any free port (tests)
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text",
    ["", "9525", "host", "host:", ":", "host:65536", "host:-1", "host:http",
     "host: 80", "host:80 ", "host:8o", "[::1]", "host:1e3", "host:0x50"],
)  # fmt: skip
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="metrics_listen: expected host:port"):
        parse_listen(text)


# --- the HTTP endpoint ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _quick_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    """Endpoint.close() waits for the serving loop's next poll (every 0.5 s): poll faster, so that
    the endpoints of this module close in milliseconds."""
    serve_forever = serve._Server.serve_forever

    def quick(self: serve._Server, poll_interval: float = 0.5) -> None:
        serve_forever(self, poll_interval=min(poll_interval, 0.02))

    monkeypatch.setattr(serve._Server, "serve_forever", quick)


@dataclass
class Served:
    endpoint: Endpoint
    metrics: Metrics
    url: str


@pytest.fixture
def served(env: Env, config: Config, clock: Clock) -> Iterator[Served]:
    env.store.insert(lm(env, 0, "u0", state=LmState.RUNNING, started=T0 - 100))
    made = metrics_for(config, clock)
    made.started(lm(env, 0, "u0"))
    page = StatusPage(lambda: config, clock=clock)
    endpoint = Endpoint("127.0.0.1:0", made, page).start()
    try:
        yield Served(endpoint, made, f"http://127.0.0.1:{endpoint.port}")
    finally:
        endpoint.close()


def get(url: str, **headers: str) -> requests.Response:
    return requests.get(url, headers=headers, timeout=5)


def test_metrics_in_the_text_format(served: Served) -> None:
    answer = get(served.url + "/metrics")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert answer.headers["Cache-Control"] == "no-store"
    assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert int(answer.headers["Content-Length"]) == len(answer.content)
    got = parse_text(answer.text)
    assert got.value("lmrunner_lm_starts_total", machinetype="alpha", backend="fake") == 1
    assert got.value("lmrunner_lms", machinetype="alpha", backend="fake", state="running") == 1
    assert got.value("lmrunner_store_up") == 1


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "application/openmetrics-text",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    ],
)
def test_metrics_in_openmetrics_when_asked(served: Served, accept: str) -> None:
    answer = get(served.url + "/metrics", Accept=accept)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
    assert answer.text.endswith("# EOF\n")
    got = parse_openmetrics(answer.text)
    assert got.value("lmrunner_lm_starts_total", machinetype="alpha", backend="fake") == 1


def test_a_query_string_is_ignored(served: Served) -> None:
    answer = get(served.url + "/metrics?name[]=lmrunner_lms")
    assert answer.status_code == 200
    assert "lmrunner_store_up" in answer.text


def test_the_status_page_at_the_root(served: Served) -> None:
    answer = get(served.url + "/")
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
    assert answer.text.startswith("<!DOCTYPE html>")
    assert "factory-00.example.com" in answer.text


@pytest.mark.parametrize("path", ["/nothing", "/metrics/", "/index.html", "/favicon.ico"])
def test_other_paths_are_not_found(served: Served, path: str) -> None:
    answer = get(served.url + path)
    assert answer.status_code == 404
    assert answer.text == "not found\n"
    assert answer.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_no_page_means_404_at_the_root(env: Env, config: Config, clock: Clock) -> None:
    endpoint = Endpoint("127.0.0.1:0", metrics_for(config, clock)).start()
    try:
        url = f"http://127.0.0.1:{endpoint.port}"
        assert get(url + "/").status_code == 404
        assert get(url + "/metrics").status_code == 200
    finally:
        endpoint.close()


@pytest.mark.parametrize("path", ["/metrics", "/", "/nothing"])
def test_head_answers_headers_without_a_body(served: Served, path: str) -> None:
    whole = get(served.url + path)
    head = requests.head(served.url + path, timeout=5)
    assert head.status_code == whole.status_code
    assert head.content == b""
    assert head.headers["Content-Type"] == whole.headers["Content-Type"]
    assert int(head.headers["Content-Length"]) > 0


def test_posting_is_not_served(served: Served) -> None:
    answer = requests.post(served.url + "/metrics", data=b"x", timeout=5)
    assert answer.status_code == 501
    assert get(served.url + "/metrics").status_code == 200


def test_a_stalled_client_does_not_block_the_next_request(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert serve._Handler.timeout == serve.TIMEOUT_SECONDS
    monkeypatch.setattr(serve._Handler, "timeout", 0.5)
    with socket.create_connection(("127.0.0.1", served.endpoint.port), timeout=5) as stalled:
        began = time.monotonic()
        answer = get(served.url + "/metrics")
        took = time.monotonic() - began
        assert answer.status_code == 200
        assert took < 0.5 + 2.0
        stalled.settimeout(2)
        assert stalled.recv(100) == b""  # the server dropped it


def test_a_trickling_client_does_not_block_the_next_request_beyond_the_timeout(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Raw sockets, each read to its end: no client leaves before its answer (a broken pipe in
    # the serving thread prints a traceback while the test runs).
    monkeypatch.setattr(serve._Handler, "timeout", 0.3)
    address = ("127.0.0.1", served.endpoint.port)
    stop = threading.Event()
    trickle = socket.create_connection(address, timeout=5)

    def dribble() -> None:
        with contextlib.suppress(OSError):
            trickle.sendall(b"GET /metrics HTTP/1.0\r\nX-Slow: ")
            while not stop.wait(0.1):  # a byte well within every read's timeout
                trickle.sendall(b"a")
            trickle.sendall(b"\r\n\r\n")  # the request is whole at last

    thread = threading.Thread(target=dribble, daemon=True)
    thread.start()
    probe = None
    try:
        time.sleep(0.1)  # the trickling client is accepted first
        probe = socket.create_connection(address, timeout=5)
        probe.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        answered_in_time = bool(select.select([probe], [], [], 1.3)[0])
    finally:
        stop.set()
        thread.join(5)
        for sock in (trickle, probe):
            if sock is not None:
                with contextlib.suppress(OSError):
                    while sock.recv(65536):
                        pass
                sock.close()
    assert answered_in_time, "no answer within 1.3 s while another client trickles its headers"


def test_close_releases_the_port(env: Env, config: Config, clock: Clock) -> None:
    first = Endpoint("127.0.0.1:0", metrics_for(config, clock)).start()
    port = first.port
    assert get(f"http://127.0.0.1:{port}/metrics").status_code == 200
    first.close()
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
    again = Endpoint(f"127.0.0.1:{port}", metrics_for(config, clock)).start()  # a restart
    try:
        assert get(f"http://127.0.0.1:{port}/metrics").status_code == 200
    finally:
        again.close()


def test_close_without_start(config: Config, clock: Clock) -> None:
    endpoint = Endpoint("127.0.0.1:0", metrics_for(config, clock))
    port = endpoint.port
    assert port > 0
    endpoint.close()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))  # nothing holds it


def test_a_taken_port_is_an_oserror(config: Config, clock: Clock) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(OSError):
            Endpoint(f"127.0.0.1:{port}", metrics_for(config, clock))


def test_serves_ipv6_loopback(config: Config, clock: Clock) -> None:
    try:
        endpoint = Endpoint("[::1]:0", metrics_for(config, clock)).start()
    except OSError as err:
        pytest.skip(f"no IPv6 loopback here: {err}")
    try:
        assert get(f"http://[::1]:{endpoint.port}/metrics").status_code == 200
    finally:
        endpoint.close()


def test_each_scrape_opens_and_closes_its_own_store(served: Served) -> None:
    """No connection outlives an answer: any of the endpoint's threads may serve the next."""
    for _ in range(3):
        assert get(served.url + "/metrics").status_code == 200
        assert get(served.url + "/").status_code == 200
    assert not hasattr(served.metrics.collector, "_store")
