"""``lmrunner daemon``: run the factory in the foreground."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import fcntl
import logging
import os
import signal
import time
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from lmrunner import service, slots
from lmrunner.backends import make_backends
from lmrunner.backends.base import Backend
from lmrunner.cli.check import unsupported_lines
from lmrunner.cli.common import common_options, load
from lmrunner.config import Config
from lmrunner.diskmethods import describe as describe_disks
from lmrunner.errors import ConfigError, LmrunnerError
from lmrunner.factory import Factory, PassReport, Tuning
from lmrunner.fetch import ca_verify
from lmrunner.health import HeartbeatWriter
from lmrunner.lmcgroups import describe, host_cgroups
from lmrunner.lmdisks import host_disks
from lmrunner.metrics import Metrics, Sources
from lmrunner.observe import Observers
from lmrunner.pipes import PipeStore
from lmrunner.pipewatch import PipeWatch
from lmrunner.prune import Pruner
from lmrunner.serve import Endpoint
from lmrunner.state import Store, StoreError
from lmrunner.statuspage import StatusPage
from lmrunner.vacquery.responder import Responder
from lmrunner.vacquery.space import SpaceWatch, others
from lmrunner.vacquery.space import describe as describe_space
from lmrunner.vacquery.vacmon import VacMon

LOG = logging.getLogger("lmrunner.daemon")
DEFAULTS = Tuning()


def add_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "daemon",
        parents=[common_options()],
        help="run the factory in the foreground",
        description="Run the factory: adopt running LMs, start new ones, notice their ends. "
        "Logs go to stderr, or to the journal with structured fields when stderr is connected to "
        "it (LMRUNNER_LOG=journal|plain overrides); under systemd (Type=notify) it reports "
        "readiness, reloads, its status and the watchdog. SIGHUP reloads the configuration "
        "(a bad file keeps the old one and says why); SIGTERM or SIGINT stop starting LMs and "
        "exit, leaving running LMs running.",
    )
    parser.add_argument("--once", action="store_true", help="do one pass, then exit")
    parser.add_argument(
        "--dry-run", action="store_true", help="print what would be started now, start nothing"
    )
    parser.add_argument(
        "--max-starts",
        type=int,
        default=DEFAULTS.max_starts_per_pass,
        metavar="N",
        help=f"LMs started per pass at most (default {DEFAULTS.max_starts_per_pass})",
    )
    parser.add_argument(
        "--reconcile",
        type=float,
        default=DEFAULTS.reconcile_seconds,
        metavar="SECONDS",
        help=f"full reconcile period (default {DEFAULTS.reconcile_seconds:g})",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    service.setup_logging()
    # A hung loop is aborted by systemd's watchdog (SIGABRT): say where it hung. (A stderr with
    # no file descriptor, as under a test's capture, has nowhere to say it.)
    with contextlib.suppress(OSError, ValueError):
        faulthandler.enable()
    config = load(args)
    for warning in config.warnings:
        LOG.warning("%s", warning)
    for line in unsupported_lines(config):  # accepted for Vac's sake, said once at start
        LOG.warning("%s", line)
    store = Store(config.factory.state_dir)
    if args.dry_run:
        try:
            return _dry_run(config, store)
        finally:
            store.close()
    lock = _exclusive(config.factory.state_dir)  # held until this process exits
    # Probing engines can take a while (a VM host's first KVM probe boots a guest): a SIGTERM
    # meanwhile is remembered and honoured once the factory exists, instead of killing us.
    early_stop: list[int] = []

    def stop_early(signum: int, frame: FrameType | None) -> None:
        early_stop.append(signum)

    signal.signal(signal.SIGTERM, stop_early)
    signal.signal(signal.SIGINT, stop_early)
    notifier = service.Notifier()
    if service.under_systemd():
        watchdog = "off" if notifier.interval is None else f"fed every {notifier.interval:g} s"
        LOG.info("systemd: notifications %s, watchdog %s",
                 "on" if notifier.enabled else "off", watchdog)  # fmt: skip
    notifier.status("probing engines")
    names = {mt.backend.value for mt in config.machinetypes.values()}
    cgroups = host_cgroups(config.factory)
    if cgroups is not None:
        LOG.info("%s", describe(cgroups, config.factory))
    disks = host_disks(config.factory)
    LOG.info("%s", describe_disks(disks))
    backends = make_backends(names, config.factory, cgroups)
    for name in sorted(names - set(backends)):
        LOG.error(
            "backend=%s: not available in this lmrunner; its machinetypes will not start", name
        )
    for backend in backends.values():
        _log_probe(backend)
    tuning = Tuning(max_starts_per_pass=args.max_starts, reconcile_seconds=args.reconcile)
    # The other factories of the space, asked beside the loop (read by the planner).
    space = SpaceWatch(lambda: factory.config)
    vacmon = VacMon(lambda: factory.config)  # fire-and-forget, from its own thread
    metrics = Metrics(
        Sources(
            config=lambda: factory.config,
            unavailable=lambda: dict(factory.unavailable),
            backends=lambda: sorted(factory.backends),
            space=space.view,
            pipes=lambda: pipes.status(time.time()),
            images=lambda: image_status(factory),
        )
    )
    factory = Factory(config, store, backends, tuning=tuning, cgroups=cgroups, disks=disks,
                      space=space.view, observer=Observers([vacmon, metrics]))  # fmt: skip
    status = _Status(factory)

    def reload() -> None:
        """Between two passes (SIGHUP only marks it): a half-applied configuration never
        meets a pass. systemd sees RELOADING=1 until READY=1, whatever the outcome."""
        notifier.reloading()
        notifier.status("reloading the configuration")
        try:
            reread()
        finally:
            status.stale = True
            notifier.reloaded()

    def reread() -> None:
        try:
            new = load(args)
        except ConfigError as err:
            for line in err.errors:
                LOG.error("reload refused, keeping the running configuration: %s", line)
            return
        for warning in new.warnings:
            LOG.warning("%s", warning)

        def make(name: str) -> Backend | None:
            made = make_backends({name}, new.factory, cgroups).get(name)
            if made is not None:
                _log_probe(made)
            return made

        factory.reconfigure(new, make)
        pipes.wake()  # a pipe may be new or have a new URL
        LOG.info("configuration reloaded from %s", ", ".join(map(str, new.files)))

    def hangup(signum: int, frame: FrameType | None) -> None:
        factory.request_reload()

    def stop(signum: int, frame: FrameType | None) -> None:
        LOG.info("signal %d: no new LMs; exiting, running LMs keep running", signum)
        notifier.stopping()
        factory.request_stop()

    pipes = PipeWatch(
        PipeStore(
            config.factory.state_dir / "pipescache", verify=ca_verify(config.factory.ca_path)
        ),
        lambda: factory.config.pipes,
        factory.request_reload,
    )
    signal.signal(signal.SIGHUP, hangup)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if early_stop:
        stop(early_stop[0], None)
    store.set_meta("daemon_pid", str(os.getpid()))
    responder = None
    endpoint = None if args.once else _endpoint(factory, metrics)
    pruner = Pruner(lambda: factory.config)
    if not args.once:
        pipes.start()
        pruner.start()
        responder = _responder(factory)  # first: factories starting together find each other
    LOG.info("%s", describe_space(config))
    if others(config):
        LOG.info("space %s: asking %s (VacQuery)", config.factory.space,
                 ", ".join(others(config)))  # fmt: skip
        try:  # the first pass plans with the space as it is (at most the deadline)
            space.round()
        except Exception:  # the space is advisory: the watch tries again
            LOG.exception("space: the first query round failed")
    if not args.once:
        space.start()
    vacmon.start()

    heartbeat = HeartbeatWriter(config.factory.state_dir)

    def passed(report: PassReport) -> None:
        notifier.status(status.after(report))
        notifier.watchdog()  # from the loop itself: a loop that hangs stops feeding it
        view = space.view()
        heartbeat.beat(factory.unavailable, factory.store_problem,
                       () if view is None else view.silent)  # fmt: skip

    notifier.status("adopting running LMs")
    try:
        factory.run(once=args.once, reload=reload, on_ready=notifier.ready, on_pass=passed,
                    max_wait=notifier.interval)  # fmt: skip
    finally:
        notifier.stopping()
        pipes.close()
        if responder is not None:
            responder.close()
        if endpoint is not None:
            endpoint.close()
        pruner.close()
        space.close()
        vacmon.close()  # after a last send of what is due
        with contextlib.suppress(StoreError):  # a broken store's own error is the one to show
            store.set_meta("daemon_pid", None)
        factory.close()
        store.close()
        lock.close()
    return 0


def _endpoint(factory: Factory, metrics: Metrics) -> Endpoint | None:
    """/metrics and the status page beside the loop; None (logged) when not configured or
    its address cannot be taken: the factory runs on, unwatched."""
    listen = factory.config.factory.metrics_listen
    if listen is None:
        return None
    try:
        page = StatusPage(lambda: factory.config, factory.space)
        endpoint = Endpoint(listen, metrics, page).start()
    except (OSError, ConfigError) as err:
        LOG.error("metrics: cannot serve on %s: %s; nothing to scrape", listen, err)
        return None
    LOG.info("metrics: serving /metrics and the status page on %s", listen)
    return endpoint


def image_status(factory: Factory) -> dict[str, tuple[str, float | None]]:
    """machinetype -> (its remote image's status, seconds since fetched), for metrics."""
    now = time.time()
    by_url = {row["url"]: row for row in factory.images.entries()}
    out: dict[str, tuple[str, float | None]] = {}
    for name, mt in factory.config.machinetypes.items():
        row = by_url.get(mt.image)
        if row is not None:
            fetched = row["fetched"]
            out[name] = (row["status"], None if fetched is None else max(now - fetched, 0.0))
    return out


def _responder(factory: Factory) -> Responder | None:
    """The VacQuery responder beside the loop; None (logged) when its port is 0 or taken: the
    factory runs on, unseen by the space."""
    port = factory.config.factory.vacquery_port
    if port == 0:
        return None
    try:
        responder = Responder(lambda: factory.config, port=port).start()
    except OSError as err:
        LOG.error("vacquery: cannot answer on UDP port %d: %s; other factories do not see "
                  "this one", port, err.strerror)  # fmt: skip
        return None
    LOG.info("vacquery: answering on UDP port %d", responder.port)
    return responder


class _Status:
    """The daemon's one-line status for systemd (``systemctl status``): LMs and free processors,
    read from the store only when a pass started or finished LMs (or after a reload), so the
    thousands-of-LMs table is not read again on every pass."""

    def __init__(self, factory: Factory) -> None:
        self.factory = factory
        self.stale = True
        self.counts = ""
        self.free = 0

    def after(self, report: PassReport) -> str:
        if self.stale or report.started or report.finished:
            try:
                active = self.factory.store.active()
            except StoreError as err:  # the loop's own business; the status just says so
                return f"state store unreadable: {err}"
            self.stale = False
            total = self.factory.config.factory.total_processors
            self.free = max(total - sum(record.processors for record in active), 0)
            self.counts = f"{len(active)} LMs running, {self.free} of {total} processors free"
        if self.factory.stopping_requested.is_set():
            return f"{self.counts}; stopping (running LMs keep running)"
        if report.blocked and self.free > 0:  # with none free, why is plain
            return f"{self.counts}; not starting: {report.blocked}"
        return self.counts


def _log_probe(backend: Backend) -> None:
    probe = backend.probe()
    LOG.info("backend=%s health=%s version=%s %s", backend.name, probe.health, probe.version,
             probe.detail)  # fmt: skip


def _exclusive(state_dir: Path) -> TextIO:
    """One daemon per state directory: two would start LMs for the same slots."""
    handle = (state_dir / "daemon.lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        handle.close()
        raise LmrunnerError(
            f"{state_dir}: another lmrunner daemon runs on this state directory"
        ) from err
    return handle


def _dry_run(config: Config, store: Store) -> int:
    """The start decisions a pass would make now (every engine taken as working)."""
    factory = Factory(config, store, {})
    decisions = factory.plan(
        store.active(), max_starts=config.factory.total_processors, working_engines_only=False
    )
    if isinstance(decisions, slots.Blocked):
        print(f"nothing would start: {decisions.reason}")
        return 0
    for decision in decisions:
        processors = f"{decision.processors} processors"
        print(f"would start {decision.machinetype} with {processors} ({decision.reason})")
    return 0
