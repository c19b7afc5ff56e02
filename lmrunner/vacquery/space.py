"""The rest of the space, as the planner sees it: what the other factories run of each
machinetype and when it last aborted anywhere (vac.md §3.4), refreshed beside the loop.

A :class:`SpaceWatch` thread asks the other factories (``machinetypes_query``) one round after
another, each bounded by ``udp_timeout_seconds``, and keeps the last view; the loop only reads it,
so a missing or slow factory never costs a pass. A view older than :data:`STALE_SECONDS` counts
as nothing known (this factory then plans alone, as before the space)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from lmrunner.config import Config
from lmrunner.vacquery import client, protocol
from lmrunner.vacquery.auth import AuthFor, from_config

LOG = logging.getLogger(__name__)
#: A view this old is not used (the watch stopped, or no round ended for long).
STALE_SECONDS = 300.0
#: A factory's last reply about a machinetype counts this long when later rounds miss it.
KEEP_SECONDS = 60.0
#: Rest between two rounds (a round itself takes at most ``udp_timeout_seconds``).
PERIOD_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class TypeInSpace:
    """One machinetype on the other factories together."""

    running_hs06: float = 0.0
    running_processors: float = 0.0
    running_machines: int = 0
    num_before_fizzle: int = 0
    last_abort: float | None = None  # when an LM of it last ended with a code >= 300, anywhere
    last_abort_factory: str | None = None


@dataclass(frozen=True, slots=True)
class SpaceView:
    """The other factories' machinetypes, from one query round."""

    taken: float  # when the round ended
    types: Mapping[str, TypeInSpace] = field(default_factory=dict)
    answered: tuple[str, ...] = ()
    silent: tuple[str, ...] = ()
    seconds: float = 0.0


def _silent(answers: client.Answers) -> tuple[str, ...]:
    """Factories that gave no reply; Vac factories whose plain replies a signed space does not
    use answered all the same (they are not missing: they are not trusted)."""
    return tuple(sorted(set(answers.replies) - set(answers.answered()) - answers.unsigned))


def abort_code(message: object) -> int | None:
    """The code of a ``shutdown_message`` ("NNN text") when it is an abort (>= 300)."""
    if not isinstance(message, str) or len(message) < 3 or not message[:3].isdigit():
        return None
    code = int(message[:3])
    return code if code >= 300 else None


def aggregate(answers: client.Answers, taken: float) -> SpaceView:
    """Vac's sums over the factories' ``machinetype_status`` replies (vac.md §3.4 step 2)."""
    sums: dict[str, dict[str, Any]] = {}
    for factory, replies in answers.replies.items():
        for name, reply in replies.items():
            entry = sums.setdefault(
                name,
                {
                    "hs06": 0.0,
                    "processors": 0.0,
                    "machines": 0,
                    "fizzle": 0,
                    "abort": None,
                    "who": None,
                },
            )
            entry["hs06"] += float(reply["running_hs06"])
            entry["processors"] += float(reply["running_processors"])
            entry["machines"] += int(reply["running_machines"])
            entry["fizzle"] += int(reply["num_before_fizzle"])
            when = reply["shutdown_time"]
            aborted = abort_code(reply["shutdown_message"]) is not None and when is not None
            if aborted and (entry["abort"] is None or when > entry["abort"]):
                entry["abort"], entry["who"] = float(when), factory
    types = {
        name: TypeInSpace(
            e["hs06"], e["processors"], e["machines"], e["fizzle"], e["abort"], e["who"]
        )
        for name, e in sums.items()
    }
    answered = tuple(answers.answered())
    silent = _silent(answers)
    return SpaceView(taken, types, answered, silent, answers.seconds)


def members(config: Config) -> list[str]:
    """Every factory of the space, this one included (``.`` in ``factory.factories`` is this
    one); this one alone when none are listed."""
    me = config.factory.hostname
    return sorted({me if name == "." else name for name in config.factory.factories} or {me})


def ask(
    config: Config,
    kind: str,
    names: list[str] | None = None,
    *,
    timeout: float | None = None,
    client_name: str = "-",
) -> client.Answers:
    """One round to ``names`` (default: every member) for inspection: signed in a space with
    a secret, Vac's unsigned replies kept and marked (:attr:`client.Answers.unsigned`).
    :class:`lmrunner.errors.ConfigError` when the space secret cannot be read."""
    factory = config.factory
    return client.query(
        kind,
        names or members(config),
        factory.space,
        port=factory.vacquery_port or protocol.DEFAULT_PORT,
        timeout=factory.udp_timeout_seconds if timeout is None else timeout,
        client=client_name,
        auth=from_config(factory.space_secret_file, factory.space_answer_vac),
        unsigned=True,
    )


def describe(config: Config) -> str:
    """One line on how this factory takes part in its space (``check``, the daemon's start)."""
    factory = config.factory
    port = factory.vacquery_port
    answering = f"answers VacQuery on UDP {port}" if port else "answers no VacQuery (port 0)"
    if factory.space_secret_file is None:
        auth = "plain (Vac's protocol, unauthenticated)"
    else:
        auth = f"signed (HMAC, {factory.space_secret_file})"
        if factory.space_answer_vac:
            auth += ", answering Vac read-only"
    line = (f"space {factory.space}: {len(others(config))} other factories; {answering}; "
            f"{auth}")  # fmt: skip
    if factory.vacmon_hostport:
        line += f"; VacMon to {', '.join(factory.vacmon_hostport)}"
    return line


def others(config: Config) -> list[str]:
    """The space's factories other than this one (``.`` is this one)."""
    me = config.factory.hostname
    return sorted({name for name in config.factory.factories if name not in (".", me)})


class SpaceWatch:
    """Keeps a fresh :class:`SpaceView` of the other factories, beside the loop."""

    def __init__(
        self,
        config: Callable[[], Config],
        *,
        period: float = PERIOD_SECONDS,
        clock: Callable[[], float] = time.time,
        resolve: Callable[[str], str] | None = None,
    ) -> None:
        self.config = config
        self.period = period
        self.clock = clock
        self.resolve = resolve
        self._view: SpaceView | None = None
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._silent: tuple[str, ...] = ()
        #: factory -> item -> (when seen, reply): the last replies of each, for lossy rounds
        self._known: dict[str, dict[str, tuple[float, dict[str, Any]]]] = {}
        self._auth = AuthFor(clock)
        self._thread = threading.Thread(target=self._run, name="space", daemon=True)

    def start(self) -> SpaceWatch:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def wake(self) -> None:
        """Start the next round now (an abort here: the others may have news too)."""
        self._wake.set()

    def view(self) -> SpaceView | None:
        """The latest view, None when there is none fresh enough to plan with."""
        view = self._view
        if view is None or self.clock() - view.taken > STALE_SECONDS:
            return None
        return view

    def round(self) -> SpaceView:
        """One query round now (the thread's work; tests call it directly)."""
        config = self.config()
        factory = config.factory
        answers = client.query(
            protocol.MACHINETYPES_QUERY,
            others(config),
            factory.space,
            port=factory.vacquery_port or protocol.DEFAULT_PORT,
            timeout=factory.udp_timeout_seconds,
            client="factory",
            resolve=self.resolve,
            auth=self._auth(factory.space_secret_file, factory.space_answer_vac),
        )
        now = self.clock()
        view = aggregate(self._remember(answers, now), now)
        view = replace(view, answered=tuple(answers.answered()), silent=_silent(answers))
        self._tell_aborts(view)
        if view.silent != self._silent:
            if view.silent:
                LOG.warning("space: no answer from %s", ", ".join(view.silent))
            elif self._silent:
                LOG.info("space: every factory answers again")
            self._silent = view.silent
        self._view = view
        return view

    def _remember(self, answers: client.Answers, now: float) -> client.Answers:
        """This round's replies over the last ones of each factory (up to KEEP_SECONDS old):
        a lossy round that missed a factory's reply, or part of them, must not make its LMs
        or its abort vanish from the view (Vac planned with one round only)."""
        for name, got in answers.replies.items():
            for item, reply in got.items():
                self._known.setdefault(name, {})[item] = (now, reply)
        merged = client.Answers(answers.kind, seconds=answers.seconds)
        for name in answers.replies:  # factories no longer in the space are forgotten
            fresh = {item: reply for item, (when, reply) in self._known.get(name, {}).items()
                     if now - when <= KEEP_SECONDS}  # fmt: skip
            self._known[name] = {item: self._known[name][item] for item in fresh}
            merged.replies[name] = fresh
        self._known = {name: self._known[name] for name in answers.replies if name in self._known}
        return merged

    def _tell_aborts(self, view: SpaceView) -> None:
        """Log each abort elsewhere once, when first seen (it backs the type off here too)."""
        before = self._view.types if self._view is not None else {}
        for name, entry in sorted(view.types.items()):
            if entry.last_abort is None:
                continue
            old = before.get(name)
            if (
                old is not None
                and old.last_abort is not None
                and old.last_abort >= entry.last_abort
            ):
                continue
            LOG.info("space: machinetype %s aborted on %s at %d (its backoff applies here too)",
                     name, entry.last_abort_factory, entry.last_abort)  # fmt: skip

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                if others(self.config()):
                    self.round()
            except Exception:  # the space is advisory: a failed round is logged, not fatal
                LOG.exception("space: a query round failed")
            self._wake.wait(self.period)
            self._wake.clear()
