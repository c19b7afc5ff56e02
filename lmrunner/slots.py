"""Which logical machines to start now: Vac's creation gate, share ranking and superslots.

Pure functions over the configuration, the LMs that hold processors now and what is known of each
machinetype's recent aborts. No I/O, no clock and no global random: the caller passes ``now``, the
load averages and a :class:`random.Random`, so every decision can be replayed in a test.

Section numbers (§) refer to ``/work/shared/reference/vac.md``.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from lmrunner.config import Config, MachinetypeConfig

#: A starting LM counts as "before fizzle" for this long after its creation (§3.4).
STARTING_WINDOW_SECONDS = 3600
#: Running processors at or below this never trigger the running-load throttle (§3.3 rule 1).
SMALL_LOAD_PROCESSORS = 4


@dataclass(frozen=True, slots=True)
class RunningLm:
    """An LM that occupies processors now (starting or running, not finished)."""

    machinetype: str
    processors: int
    hs06: float  # processors x hs06_per_processor (x 1.0 when unset)
    shutdown_time: int  # its superslot is identified by this exact time (§3.5)
    created: float
    started: float | None  # None while starting


@dataclass(frozen=True, slots=True)
class TypeHistory:
    """What this factory knows of a machinetype's recent ends, and what the other factories of
    the space run of it (VacQuery: :mod:`lmrunner.vacquery.space`)."""

    #: End time of the most recent LM of the type that ended with code >= 300 (§7.2) here or,
    #: with a space, on any factory; None when there was none or a later LM ended well.
    last_abort: float | None
    #: HS06 of the type running on the other factories (counted in its share, §3.4 step 2).
    elsewhere_hs06: float = 0.0
    #: LMs of the type before fizzle on the other factories (extend a backoff as local ones do).
    elsewhere_before_fizzle: int = 0


@dataclass(frozen=True, slots=True)
class StartDecision:
    """Start one LM of ``machinetype`` with ``processors`` until ``shutdown_time``."""

    machinetype: str
    processors: int
    shutdown_time: int
    reason: str  # short, for logs


@dataclass(frozen=True, slots=True)
class Blocked:
    """Why nothing (more) can start now; for logs and ``lmrunner machinetypes``."""

    reason: str


def num_before_fizzle(mt: MachinetypeConfig, running: Sequence[RunningLm], now: float) -> int:
    """Count this factory's LMs of ``mt`` that have not yet survived ``fizzle_seconds`` (§3.4).

    Vac's ``num_before_fizzle``: LMs started less than ``fizzle_seconds`` ago, plus LMs created
    less than 3600 s ago that have not started. (Vac also wants a heartbeat within 3600 s; an LM
    in ``running`` is by definition not finished, so that check belongs to the caller.)

    Args:
        mt: the machinetype.
        running: the LMs occupying processors now.
        now: the current Unix time.

    Returns:
        The number of such LMs.
    """
    count = 0
    for lm in running:
        if lm.machinetype != mt.name:
            continue
        if lm.started is None:
            count += now - lm.created < STARTING_WINDOW_SECONDS
        else:
            count += now - lm.started < mt.fizzle_seconds
    return count


def eligible(
    mt: MachinetypeConfig,
    config: Config,
    running: Sequence[RunningLm],
    history: TypeHistory | None,
    now: float,
) -> str | None:
    """Whether an LM of ``mt`` may start now, by Vac's eligibility rule (§3.4 step 3).

    Args:
        mt: the machinetype.
        config: the whole configuration (for the factory's ``shutdown_time``).
        running: the LMs occupying processors now (for ``num_before_fizzle``).
        history: the type's recent aborts; None when nothing is known.
        now: the current Unix time.

    Returns:
        None when eligible, else a short reason such as ``"backoff until 1700000600"``.
    """
    if mt.target_share <= 0:
        return "target_share 0"
    deadline = config.factory.shutdown_time
    if deadline is not None and not now + mt.effective_min_wallclock < deadline:
        return "min_wallclock_seconds beyond shutdown_time"
    if history is not None and history.last_abort is not None:
        # After an abort: backoff_seconds, extended by fizzle_seconds while a probing LM of the
        # type is still before fizzle, so one LM tries the type before all others follow (§3.4).
        probing = num_before_fizzle(mt, running, now) + history.elsewhere_before_fizzle
        fizzle = mt.fizzle_seconds if probing > 0 else 0
        until = history.last_abort + mt.backoff_seconds + fizzle
        if not history.last_abort < now - mt.backoff_seconds - fizzle:
            return f"backoff until {int(until)}"
    return None


def _scores(
    config: Config,
    running: Sequence[RunningLm],
    histories: Mapping[str, TypeHistory] | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Score of each type with a share and of each machinegroup (see :func:`ranked`), over the
    whole space when ``histories`` tell what the other factories run."""
    hs06: dict[str, float] = defaultdict(float)
    for lm in running:
        hs06[lm.machinetype] += lm.hs06
    for name, history in (histories or {}).items():
        hs06[name] += history.elsewhere_hs06
    score: dict[str, float] = {}
    group: dict[str, float] = defaultdict(float)
    for name, mt in config.machinetypes.items():
        if mt.target_share > 0:
            score[name] = hs06[name] / mt.target_share
            group[mt.effective_machinegroup] += score[name]
    return score, group


def ranked(
    config: Config,
    running: Sequence[RunningLm],
    histories: Mapping[str, TypeHistory],
    now: float,
    rng: random.Random,
) -> list[MachinetypeConfig]:
    """The eligible machinetypes, most starved first (§3.4 steps 2 and 4).

    Sorted ascending by ``(machinegroup score, score, random)`` where, as in Vac (§3.4 step 2):

    - ``score(t) = running_hs06(t) / target_share(t)``;
    - ``machinegroup score(g) = sum of score(t) over the types t of g with a share``, i.e. each
      type's HS06 is divided by its *own* share, not by the group's total share.

    This factory's LMs are counted, plus what ``histories`` say the other factories of the
    space run (``elsewhere_hs06``, from VacQuery replies). One ``rng.random()`` is drawn per
    eligible type, in name order, so a seeded ``rng`` gives a reproducible order.

    Args:
        config: the whole configuration.
        running: the LMs occupying processors now.
        histories: recent aborts by machinetype name (missing: none known).
        now: the current Unix time.
        rng: the source of the random tie-break.

    Returns:
        The eligible machinetypes in the order to try them.
    """
    score, group = _scores(config, running, histories)
    keyed: list[tuple[float, float, float, MachinetypeConfig]] = []
    for name in sorted(config.machinetypes):
        mt = config.machinetypes[name]
        if eligible(mt, config, running, histories.get(name), now) is None:
            keyed.append((group[mt.effective_machinegroup], score[name], rng.random(), mt))
    keyed.sort(key=lambda k: k[:3])
    return [k[3] for k in keyed]


def gate(
    config: Config,
    running: Sequence[RunningLm],
    now: float,
    load_average: tuple[float, float, float],
    counted_cpus: int,
) -> Blocked | None:
    """Vac's creation gate (§3.3): the first matching rule blocks all creation this cycle.

    Args:
        config: the whole configuration.
        running: the LMs occupying processors now.
        now: the current Unix time.
        load_average: the host's 1, 5 and 15 minute load averages.
        counted_cpus: all processors of the host (not just ``total_processors``).

    Returns:
        None when LMs may be created, else why not.
    """
    factory = config.factory
    used = sum(lm.processors for lm in running)
    load = max(load_average)
    overload = factory.overload_per_processor
    # Rule 1 applies only above 4 processors: a nearly empty host may be loaded by its own
    # booting LMs or by the factory itself, and would otherwise never fill up.
    if used > SMALL_LOAD_PROCESSORS and load > overload * used:
        return Blocked(f"load {load:.2f} > {overload:g} x {used} running processors")
    if load > overload * counted_cpus:
        return Blocked(f"load {load:.2f} > {overload:g} x {counted_cpus} processors")
    if factory.shutdown_time is not None and now >= factory.shutdown_time:
        return Blocked(f"shutdown_time {factory.shutdown_time} reached")
    if factory.draining:
        return Blocked("draining")
    if used >= factory.total_processors:
        return Blocked(f"all {factory.total_processors} processors in use")
    return None


def _choose(
    config: Config,
    running: Sequence[RunningLm],
    types: Sequence[MachinetypeConfig],
    now: float,
    histories: Mapping[str, TypeHistory] | None = None,
) -> StartDecision | str:
    """Vac's superslot choice (§3.5) among ``types`` (already ranked); a reason when none fits."""
    pps = config.factory.processors_per_superslot
    free = config.factory.total_processors - sum(lm.processors for lm in running)
    superslots: dict[int, int] = defaultdict(int)
    for lm in running:
        superslots[lm.shutdown_time] += lm.processors
    score, _ = _scores(config, running, histories)
    # Incomplete superslots first, earliest-ending first: they reserve the processors that let
    # the whole block free up together. Reserved processors stay unavailable to new superslots
    # even when no type fits them (so that a multi-processor LM gets its block later).
    for end in sorted(superslots):
        remainder = superslots[end] % pps
        if remainder == 0:
            continue
        reserved = min(free, pps - remainder)
        for mt in types:
            if (
                mt.min_processors <= reserved
                and mt.effective_min_wallclock <= end - now <= mt.max_wallclock_seconds
            ):
                processors = min(reserved, mt.max_processors, pps)
                why = f"score {score[mt.name]:.2f}, superslot ending {end}"
                return StartDecision(mt.name, processors, end, why)
        free -= reserved
    for mt in types:
        if min(free, pps) >= mt.min_processors:
            shutdown = int(now) + mt.max_wallclock_seconds
            # Improvement over Vac (§3.5): Vac wrote the uncapped time and lowered it only in the
            # next cycle; capping here keeps wall_limit_secs/cpu_limit_secs and the superslot
            # honest. Eligibility already ensured min_wallclock_seconds still fits.
            if config.factory.shutdown_time is not None:
                shutdown = min(shutdown, config.factory.shutdown_time)
            processors = min(free, mt.max_processors, pps)
            why = f"score {score[mt.name]:.2f}, new superslot"
            return StartDecision(mt.name, processors, shutdown, why)
    return f"no eligible machinetype fits {max(free, 0)} free processors"


def plan(
    config: Config,
    running: Sequence[RunningLm],
    histories: Mapping[str, TypeHistory],
    *,
    now: float,
    load_average: tuple[float, float, float],
    counted_cpus: int,
    rng: random.Random,
    max_starts: int,
) -> list[StartDecision] | Blocked:
    """Decide up to ``max_starts`` LMs to start now, filling free processors in one pass.

    Vac started one LM per cycle; this repeats its choice (§3.3 gate, §3.4 ranking, §3.5
    superslots) with each decided LM added to the working set as a starting LM, so shares,
    superslots and ``num_before_fizzle`` see the LMs decided earlier in the same pass.

    Args:
        config: the whole configuration.
        running: the LMs occupying processors now.
        histories: recent aborts by machinetype name (missing: none known).
        now: the current Unix time.
        load_average: the host's 1, 5 and 15 minute load averages.
        counted_cpus: all processors of the host.
        rng: the source of the random tie-break.
        max_starts: the most decisions to return.

    Returns:
        The decisions in order (possibly fewer than ``max_starts``), or :class:`Blocked` when
        not even one LM can start.
    """
    working = list(running)
    decisions: list[StartDecision] = []
    while len(decisions) < max_starts:
        blocked = gate(config, working, now, load_average, counted_cpus)
        if blocked is not None:
            return decisions or blocked
        types = ranked(config, working, histories, now, rng)
        if not types:
            if decisions:
                break
            why = [
                f"{name}: {reason}"
                for name, mt in sorted(config.machinetypes.items())
                if (reason := eligible(mt, config, working, histories.get(name), now)) is not None
            ]
            return Blocked("no eligible machinetype" + (f" ({'; '.join(why)})" if why else ""))
        decision = _choose(config, working, types, now, histories)
        if isinstance(decision, str):
            return decisions or Blocked(decision)
        decisions.append(decision)
        per_processor = config.factory.hs06_per_processor
        per_processor = 1.0 if per_processor is None else per_processor
        working.append(
            RunningLm(
                machinetype=decision.machinetype,
                processors=decision.processors,
                hs06=decision.processors * per_processor,
                shutdown_time=decision.shutdown_time,
                created=now,
                started=None,
            )
        )
    return decisions
