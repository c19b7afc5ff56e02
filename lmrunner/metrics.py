"""Prometheus metrics of one factory (``prometheus-client``; OpenMetrics or the text format).

Two kinds, so that the loop never waits for a scrape:

- **Events** the loop tells (:class:`lmrunner.observe.Observer`): starts, ends by outcome code
  and source, CPU seconds and OOM kills of ended LMs, pass durations and the reaction time to an
  engine's event. Counters and histograms in this process (reset when it restarts, as
  Prometheus expects of counters).
- **State** read when scraped (:class:`FactoryCollector`), in the serving thread: LMs by
  machinetype, backend and state, processors, backoff, live CPU and memory of the running LMs
  (from their cgroups), engine health, pipes, images, the space, the state directory. It reads
  the store through its own read-only connection, and the factory's live objects only through
  :class:`Sources` (plain reads of values the loop replaces whole).

Metric names and labels are documented in docs/operations.md; the alert rules in contrib/ use
them.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lmrunner import __version__, planning
from lmrunner.cgroups.base import CgroupRef, live_usage
from lmrunner.config import Config
from lmrunner.errors import CgroupError
from lmrunner.lifecycle import ACTIVE
from lmrunner.observe import Observer
from lmrunner.state import LmRecord, Store, StoreError
from lmrunner.vacquery.space import SpaceView

PREFIX = "lmrunner"
#: Pass durations: a pass is milliseconds at thousands of LMs; seconds mean trouble.
PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: From an engine's event to its LM's end being recorded (the brief: within a second).
REACTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class Sources:
    """Where the scrape-time collector reads the factory's live state (each a cheap read)."""

    config: Callable[[], Config]
    #: backend -> why it does not work now (its machinetypes do not start); others work
    unavailable: Callable[[], Mapping[str, str]] = dict
    backends: Callable[[], list[str]] = list
    space: Callable[[], SpaceView | None] = lambda: None
    #: pipe -> (seconds since its copy was fetched or None, failed refreshes so far)
    pipes: Callable[[], Mapping[str, tuple[float | None, int]]] = dict
    #: machinetype -> (image status "ready"/"downloading"/"failed", seconds since fetched)
    images: Callable[[], Mapping[str, tuple[str, float | None]]] = dict
    clock: Callable[[], float] = time.time


class Metrics(Observer):
    """The factory's registry: event counters fed by the loop, state read when scraped."""

    def __init__(self, sources: Sources) -> None:
        # No auto_describe: registering must not run a scrape (the factory may not exist yet).
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        # Registered first: a scrape runs it first, and it makes the configured machinetypes'
        # counters (at 0) before the registry reaches them in that same scrape.
        self.collector = FactoryCollector(sources, self._prepare)
        r.register(self.collector)
        self.starts = Counter(
            f"{PREFIX}_lm_starts", "LMs started.", ["machinetype", "backend"], registry=r
        )
        self.ends = Counter(
            f"{PREFIX}_lm_ends",
            "LMs ended, by the code of their outcome (shutdown_message codes: 200 done, 300 no "
            "more work, ...) and its source (payload, heartbeat, oom, wallclock, lost, ...).",
            ["machinetype", "backend", "code", "source"],
            registry=r,
        )
        self.cpu = Counter(
            f"{PREFIX}_lm_cpu_seconds",
            "CPU seconds used by LMs that ended (measured in their cgroups).",
            ["machinetype"],
            registry=r,
        )
        self.ooms = Counter(
            f"{PREFIX}_lm_oom_kills",
            "LMs ended by the kernel's OOM killer at their memory limit.",
            ["machinetype"],
            registry=r,
        )
        self.passes = Histogram(
            f"{PREFIX}_pass_duration_seconds",
            "Time of one factory pass.",
            buckets=PASS_BUCKETS,
            registry=r,
        )
        self.reactions = Histogram(
            f"{PREFIX}_event_reaction_seconds",
            "From an engine's event (an LM may have ended) to the pass that handled it.",
            buckets=REACTION_BUCKETS,
            registry=r,
        )
        self.last_pass = Gauge(
            f"{PREFIX}_last_pass_timestamp_seconds",
            "When the factory's loop last completed a pass.",
            registry=r,
        )
        self.blocked = Gauge(
            f"{PREFIX}_state_dir_blocked",
            "1 while the state directory cannot take more (full or read-only): no LM starts.",
            registry=r,
        )

    # --- the loop's news: counters only -------------------------------------------------------

    def _prepare(self, config: Config) -> None:
        """Each configured machinetype's counters exist from the first scrape (at 0), so that
        increase() counts its first start or OOM kill after a restart."""
        for mt in config.machinetypes.values():
            self.starts.labels(mt.name, mt.backend.value)
            self.ooms.labels(mt.name)
            self.cpu.labels(mt.name)

    def started(self, record: LmRecord) -> None:
        self.starts.labels(record.machinetype, record.backend).inc()

    def ended(self, record: LmRecord) -> None:
        outcome = record.outcome
        code = "" if outcome is None else str(outcome.code)
        source = "" if outcome is None else outcome.source.value
        self.ends.labels(record.machinetype, record.backend, code, source).inc()
        if record.cpu_seconds:
            self.cpu.labels(record.machinetype).inc(record.cpu_seconds)
        if source == "oom":
            self.ooms.labels(record.machinetype).inc()

    def passed(self, seconds: float, blocked: str | None) -> None:
        self.passes.observe(seconds)
        self.last_pass.set(time.time())
        self.blocked.set(1 if blocked else 0)

    def reacted(self, seconds: float) -> None:
        self.reactions.observe(seconds)


class FactoryCollector(Collector):
    """State metrics, computed on each scrape from the store and :class:`Sources`."""

    def __init__(
        self, sources: Sources, prepare: Callable[[Config], None] = lambda config: None
    ) -> None:
        self.sources = sources
        self.prepare = prepare
        self.scrapes = 0

    def _read(self, config: Config) -> tuple[list[LmRecord], dict[str, LmRecord]] | None:
        # A connection per scrape (a millisecond): whichever thread serves it may use it.
        try:
            store = Store(config.factory.state_dir, readonly=True)
        except StoreError:
            return None
        try:
            return store.active(), store.last_finished(config.machinetypes)
        except StoreError:
            return None
        finally:
            store.close()

    def collect(self) -> Iterator[Metric]:
        self.scrapes += 1
        sources = self.sources
        config = sources.config()
        now = sources.clock()
        self.prepare(config)
        yield _one(
            "build_info",
            "This lmrunner: version and Python.",
            1.0,
            version=__version__,
            python=platform.python_version(),
        )
        read = self._read(config)
        yield _one(
            "store_up",
            "1 when the state store could be read for this scrape.",
            float(read is not None),
        )
        active, _last = read if read is not None else ([], {})
        yield from _lms(config, active)
        yield from _usage(active)
        yield from _machinetypes(config, active, read, sources, now)
        yield from _engines(sources)
        yield from _pipes_and_images(sources)
        yield from _space(sources, now)
        yield from _state_dir(config)


def _one(name: str, text: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{PREFIX}_{name}", text, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _lms(config: Config, active: list[LmRecord]) -> Iterator[Metric]:
    lms = GaugeMetricFamily(
        f"{PREFIX}_lms",
        "LMs now, by machinetype, backend and state.",
        labels=["machinetype", "backend", "state"],
    )
    counts: dict[tuple[str, str, str], int] = {}
    for record in active:
        key = (record.machinetype, record.backend, record.state.value)
        counts[key] = counts.get(key, 0) + 1
    for mt in config.machinetypes.values():  # a type with none shows 0, not nothing
        counts.setdefault((mt.name, mt.backend.value, "running"), 0)
    for key, count in sorted(counts.items()):
        lms.add_metric(list(key), count)
    yield lms
    used = sum(r.processors for r in active if r.state in ACTIVE)
    yield _one("processors_used", "Processors held by active LMs.", used)
    yield _one(
        "processors_total",
        "Processors this factory may fill (total_processors).",
        config.factory.total_processors,
    )
    yield _one(
        "draining",
        "1 when the factory starts no new LMs (draining).",
        float(config.factory.draining),
    )


def _usage(active: list[LmRecord]) -> Iterator[Metric]:
    """Live CPU and memory of the running LMs, per machinetype, from their cgroups."""
    cpu: dict[str, float] = {}
    memory: dict[str, float] = {}
    for record in active:
        if record.cgroup is None:
            continue
        try:
            live = live_usage(CgroupRef.from_json(record.cgroup))
        except (CgroupError, ValueError):
            live = None
        if live is None:
            continue
        cpu[record.machinetype] = cpu.get(record.machinetype, 0.0) + live[0]
        memory[record.machinetype] = memory.get(record.machinetype, 0.0) + live[1]
    families = (
        ("running_cpu_seconds", "CPU seconds used so far by the running LMs.", cpu),
        ("running_memory_bytes", "Memory the running LMs use now.", memory),
    )
    for name, text, values in families:
        family = GaugeMetricFamily(f"{PREFIX}_{name}", text, labels=["machinetype"])
        for machinetype, value in sorted(values.items()):
            family.add_metric([machinetype], value)
        yield family


def _machinetypes(
    config: Config,
    active: list[LmRecord],
    read: object,
    sources: Sources,
    now: float,
) -> Iterator[Metric]:
    share = GaugeMetricFamily(
        f"{PREFIX}_machinetype_target_share", "Configured target share.", labels=["machinetype"]
    )
    backoff = GaugeMetricFamily(
        f"{PREFIX}_machinetype_backoff",
        "1 while the machinetype backs off (an abort here or elsewhere in the space within "
        "backoff_seconds).",
        labels=["machinetype"],
    )
    for mt in config.machinetypes.values():
        share.add_metric([mt.name], mt.target_share)
    last_abort = GaugeMetricFamily(
        f"{PREFIX}_machinetype_last_abort_timestamp_seconds",
        "When an LM of the machinetype last ended with a code of 300 or more, here or anywhere "
        "in the space (what backoff counts from).",
        labels=["machinetype"],
    )
    if read is not None and config.machinetypes and isinstance(read, tuple):
        _active, last = read
        histories = planning.histories_from(config, last, sources.space())
        for name, mt in config.machinetypes.items():
            history = histories.get(name)
            abort = None if history is None else history.last_abort
            backing = abort is not None and now < abort + mt.backoff_seconds
            backoff.add_metric([name], float(backing))
            if abort is not None:
                last_abort.add_metric([name], abort)
    yield share
    yield backoff
    yield last_abort


def _engines(sources: Sources) -> Iterator[Metric]:
    up = GaugeMetricFamily(
        f"{PREFIX}_engine_up",
        "1 when the backend's engine works (its machinetypes can start).",
        labels=["backend"],
    )
    down = sources.unavailable()
    for name in sorted(set(sources.backends()) | set(down)):
        up.add_metric([name], float(name not in down))
    yield up


def _pipes_and_images(sources: Sources) -> Iterator[Metric]:
    age = GaugeMetricFamily(
        f"{PREFIX}_pipe_age_seconds", "Age of each Vacuum Pipe's copy.", labels=["pipe"]
    )
    failures = CounterMetricFamily(
        f"{PREFIX}_pipe_refresh_failures",
        "Failed refreshes of each Vacuum Pipe since the daemon started.",
        labels=["pipe"],
    )
    for name, (seconds, failed) in sorted(sources.pipes().items()):
        if seconds is not None:
            age.add_metric([name], seconds)
        failures.add_metric([name], failed)
    yield age
    yield failures
    ready = GaugeMetricFamily(
        f"{PREFIX}_image_ready",
        "1 when the machinetype's remote image has a usable copy.",
        labels=["machinetype", "status"],
    )
    image_age = GaugeMetricFamily(
        f"{PREFIX}_image_age_seconds",
        "Age of the machinetype's remote image copy.",
        labels=["machinetype"],
    )
    for name, (status, seconds) in sorted(sources.images().items()):
        ready.add_metric([name, status], float(status == "ready"))
        if seconds is not None:
            image_age.add_metric([name], seconds)
    yield ready
    yield image_age


def _space(sources: Sources, now: float) -> Iterator[Metric]:
    view = sources.space()
    peers = GaugeMetricFamily(
        f"{PREFIX}_space_factories",
        "Other factories of the space, by whether they answered the last query round.",
        labels=["answered"],
    )
    if view is not None:
        peers.add_metric(["true"], len(view.answered))
        peers.add_metric(["false"], len(view.silent))
    yield peers
    if view is not None:
        yield _one("space_round_seconds", "How long the last VacQuery round took.", view.seconds)
        yield _one(
            "space_view_age_seconds",
            "Age of the space view the planner uses.",
            max(now - view.taken, 0.0),
        )


def _state_dir(config: Config) -> Iterator[Metric]:
    try:
        info = os.statvfs(config.factory.state_dir)
    except OSError:
        return
    yield _one(
        "state_dir_free_bytes",
        "Free space of the state directory's filesystem.",
        info.f_bavail * info.f_frsize,
    )
    yield _one(
        "state_dir_size_bytes",
        "Size of the state directory's filesystem.",
        info.f_blocks * info.f_frsize,
    )
