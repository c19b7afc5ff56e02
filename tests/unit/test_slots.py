"""Which LMs to start: the creation gate, shares, backoff/fizzle and superslots (vac.md §3)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lmrunner.config import Config
from lmrunner.loader import load_config
from lmrunner.slots import (
    Blocked,
    RunningLm,
    StartDecision,
    TypeHistory,
    eligible,
    gate,
    num_before_fizzle,
    plan,
    ranked,
)

NOW = 1_700_000_000.0
T = int(NOW)
IDLE = (0.0, 0.0, 0.0)


def make_config(tmp_path: Path, types: dict[str, dict[str, Any]], **factory: Any) -> Config:
    """Write a YAML configuration with these machinetypes and factory options, and load it."""
    mts = {
        name: {"backend": "docker", "image": "docker://busybox:latest", **options}
        for name, options in types.items()
    }
    data = {
        "factory": {"space": "vac01.example.com", "state_dir": str(tmp_path / "s"), **factory},
        "machinetypes": mts,
    }
    path = tmp_path / "lmrunner.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, hostname="factory01.example.com", cpus=64, check_files=False)


def lm(
    machinetype: str,
    processors: int = 1,
    *,
    shutdown_time: int = T + 86400,
    created: float = NOW - 7200,
    started: float | None = NOW - 7000,
    hs06: float | None = None,
) -> RunningLm:
    return RunningLm(
        machinetype=machinetype,
        processors=processors,
        hs06=float(processors) if hs06 is None else hs06,
        shutdown_time=shutdown_time,
        created=created,
        started=started,
    )


def run_plan(
    config: Config,
    running: list[RunningLm] | None = None,
    histories: dict[str, TypeHistory] | None = None,
    *,
    seed: int = 1,
    max_starts: int = 64,
    load: tuple[float, float, float] = IDLE,
    now: float = NOW,
) -> list[StartDecision] | Blocked:
    return plan(
        config,
        running or [],
        histories or {},
        now=now,
        load_average=load,
        counted_cpus=64,
        rng=random.Random(seed),
        max_starts=max_starts,
    )


def decisions(result: list[StartDecision] | Blocked) -> list[StartDecision]:
    assert not isinstance(result, Blocked), result
    return result


# --- num_before_fizzle (§3.4) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lms", "expected"),
    [
        ([], 0),
        ([lm("a", created=NOW - 10, started=None)], 1),  # starting counts
        ([lm("a", created=NOW - 3600, started=None)], 0),  # starting > 1 h ago does not
        ([lm("a", started=NOW - 599)], 1),  # running for less than fizzle_seconds
        ([lm("a", started=NOW - 600)], 0),  # survived fizzle_seconds
        ([lm("b", started=NOW - 1)], 0),  # another type
        ([lm("a", started=NOW - 1), lm("a", started=None, created=NOW), lm("a")], 2),
    ],
)
def test_num_before_fizzle(tmp_path: Path, lms: list[RunningLm], expected: int) -> None:
    config = make_config(tmp_path, {"a": {"target_share": 1, "fizzle_seconds": 600}})
    assert num_before_fizzle(config.machinetypes["a"], lms, NOW) == expected


# --- eligibility: share, shutdown_time, backoff and fizzle (§3.4 step 3) ------------------------

BACKOFF = {"target_share": 1, "backoff_seconds": 100, "fizzle_seconds": 600}


@pytest.mark.parametrize(
    ("options", "factory", "running", "last_abort", "expected"),
    [
        ({"target_share": 1}, {}, [], None, None),
        ({"target_share": 0}, {}, [], None, "target_share 0"),
        # min_wallclock (default: max_wallclock) must end strictly before the factory's end.
        ({"target_share": 1}, {"shutdown_time": T + 86401}, [], None, None),
        (
            {"target_share": 1},
            {"shutdown_time": T + 86400},
            [],
            None,
            "min_wallclock_seconds beyond shutdown_time",
        ),
        (
            {"target_share": 1, "min_wallclock_seconds": 600},
            {"shutdown_time": T + 601},
            [],
            None,
            None,
        ),
        # Backoff: blocked until last_abort + backoff_seconds, then free.
        (BACKOFF, {}, [], NOW - 50, f"backoff until {T + 50}"),
        (BACKOFF, {}, [], NOW - 100, f"backoff until {T}"),
        (BACKOFF, {}, [], NOW - 101, None),
        # Fizzle: a probing LM before fizzle extends the window by fizzle_seconds.
        (BACKOFF, {}, [lm("a", started=NOW - 10)], NOW - 101, f"backoff until {T + 599}"),
        (BACKOFF, {}, [lm("a", started=None, created=NOW)], NOW - 500, f"backoff until {T + 200}"),
        (BACKOFF, {}, [lm("a", started=NOW - 10)], NOW - 701, None),
        # An LM that survived fizzle_seconds does not extend it; another type's LM neither.
        (BACKOFF, {}, [lm("a", started=NOW - 600)], NOW - 101, None),
        (BACKOFF, {}, [lm("b", started=NOW - 10)], NOW - 101, None),
    ],
)
def test_eligible(
    tmp_path: Path,
    options: dict[str, Any],
    factory: dict[str, Any],
    running: list[RunningLm],
    last_abort: float | None,
    expected: str | None,
) -> None:
    config = make_config(tmp_path, {"a": options, "b": {"target_share": 1}}, **factory)
    history = TypeHistory(last_abort=last_abort)
    assert eligible(config.machinetypes["a"], config, running, history, NOW) == expected


def test_eligible_without_history(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"a": {"target_share": 1}})
    assert eligible(config.machinetypes["a"], config, [], None, NOW) is None


# --- ranking by share and machinegroup (§3.4 steps 2 and 4) -------------------------------------


def names(
    config: Config, running: list[RunningLm], seed: int = 0, **hist: TypeHistory
) -> list[str]:
    return [mt.name for mt in ranked(config, running, hist, NOW, random.Random(seed))]


def test_most_starved_type_first(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        {"a": {"target_share": 1}, "b": {"target_share": 2}, "c": {"target_share": 1}},
    )
    # scores: a = 3/1 = 3, b = 4/2 = 2, c = 0
    running = [lm("a", 3), lm("b", 4)]
    assert names(config, running) == ["c", "b", "a"]


def test_share_zero_never_ranked(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"a": {"target_share": 0}, "b": {"target_share": 1}})
    assert names(config, [lm("b", 10)]) == ["b"]
    result = run_plan(make_config(tmp_path, {"a": {"target_share": 0}}))
    assert result == Blocked("no eligible machinetype (a: target_share 0)")


def test_backed_off_type_not_ranked(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"a": BACKOFF, "b": {"target_share": 1}})
    assert names(config, [lm("b", 10)], a=TypeHistory(NOW - 1)) == ["b"]
    assert names(config, [lm("b", 10)], a=TypeHistory(NOW - 101)) == ["a", "b"]


def test_machinegroup_score_comes_first(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        {
            "a": {"target_share": 1, "machinegroup": "g"},
            "b": {"target_share": 1, "machinegroup": "g"},
            "c": {"target_share": 1},
        },
    )
    # group g = 3 + 0 > c = 2: c is first although b has nothing running.
    assert names(config, [lm("a", 3), lm("c", 2)]) == ["c", "b", "a"]


def test_machinegroup_score_sums_each_types_own_score(tmp_path: Path) -> None:
    """Vac's formula: group score = sum of hs06(t)/share(t), not sum hs06 / sum share."""
    config = make_config(
        tmp_path,
        {
            "a": {"target_share": 2, "accounting_fqan": "/lhcb"},  # group from accounting_fqan
            "b": {"target_share": 1, "accounting_fqan": "/lhcb"},
            "c": {"target_share": 1},
        },
    )
    # g = 4/2 + 1/1 = 3 > c = 2.5 (with sum/sum g would be 5/3 < 2.5).
    assert names(config, [lm("a", 4), lm("b", 1), lm("c", 1, hs06=2.5)]) == ["c", "b", "a"]


def test_tie_broken_by_rng_deterministically(tmp_path: Path) -> None:
    config = make_config(tmp_path, {n: {"target_share": 1} for n in "abcd"})
    orders = {tuple(names(config, [], seed)) for seed in range(20)}
    assert len(orders) > 1  # the seed matters...
    for seed in range(5):  # ...and the same seed always gives the same order
        assert names(config, [], seed) == names(config, [], seed)


# --- the creation gate (§3.3) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("running", "load", "factory", "expected"),
    [
        ([], IDLE, {}, None),
        # rule 1: load above overload x running processors, only with more than 4 running
        ([lm("a")] * 5, (6.3, 0.0, 0.0), {}, "load 6.30 > 1.25 x 5 running processors"),
        ([lm("a")] * 5, (0.0, 0.0, 6.3), {}, "load 6.30 > 1.25 x 5 running processors"),
        ([lm("a")] * 5, (6.25, 6.25, 6.25), {}, None),
        ([lm("a")] * 4, (50.0, 50.0, 50.0), {}, None),
        # rule 2: load above overload x all counted processors (64)
        ([], (80.5, 0.0, 0.0), {}, "load 80.50 > 1.25 x 64 processors"),
        ([], (80.0, 0.0, 0.0), {}, None),
        # rule 3: factory shutdown_time reached
        ([], IDLE, {"shutdown_time": T}, f"shutdown_time {T} reached"),
        ([], IDLE, {"shutdown_time": T + 1}, None),
        # rule 4: draining
        ([], IDLE, {"draining": True}, "draining"),
        # rule 5: all total_processors in use
        ([lm("a", 4), lm("a", 4)], IDLE, {"total_processors": 8}, "all 8 processors in use"),
        ([lm("a", 4), lm("a", 3)], IDLE, {"total_processors": 8}, None),
        # first matching rule wins
        ([], (100.0, 0, 0), {"draining": True}, "load 100.00 > 1.25 x 64 processors"),
    ],
)
def test_gate(
    tmp_path: Path,
    running: list[RunningLm],
    load: tuple[float, float, float],
    factory: dict[str, Any],
    expected: str | None,
) -> None:
    config = make_config(tmp_path, {"a": {"target_share": 1}}, **factory)
    result = gate(config, running, NOW, load, 64)
    assert result == (None if expected is None else Blocked(expected))
    if expected is not None:
        assert run_plan(config, running, load=load) == Blocked(expected)


def test_total_processors_limits_plan(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"a": {"target_share": 1}}, total_processors=8)
    result = decisions(run_plan(config, [lm("a")] * 6))
    assert [d.processors for d in result] == [1, 1]


# --- processors, wallclock and superslots (§3.5) ------------------------------------------------


def test_default_superslot_gives_one_processor(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"a": {"target_share": 1, "max_processors": 8}})
    result = decisions(run_plan(config, max_starts=3))
    assert [(d.processors, d.shutdown_time) for d in result] == [(1, T + 86400)] * 3


@pytest.mark.parametrize(
    ("options", "running", "expected"),
    [
        # Incomplete superslots first, earliest-ending first: 3 of 4 used ending at T+3000.
        (
            {"max_processors": 4},
            [lm("a", 2, shutdown_time=T + 5000), lm("a", 3, shutdown_time=T + 3000)],
            (1, T + 3000),
        ),
        # processors = min(reserved, max_processors, pps)
        ({"max_processors": 4}, [lm("a", 1, shutdown_time=T + 3000)], (3, T + 3000)),
        ({"max_processors": 2}, [lm("a", 1, shutdown_time=T + 3000)], (2, T + 3000)),
        # min_processors above the reserved processors: the next incomplete superslot.
        (
            {"min_processors": 2, "max_processors": 4},
            [lm("a", 3, shutdown_time=T + 3000), lm("a", 1, shutdown_time=T + 5000)],
            (3, T + 5000),
        ),
        # Joining needs min_wallclock <= end - now <= max_wallclock: else a new superslot, with
        # the incomplete superslot's reserved processor kept back (16 - 3 - 1 = 12 free).
        (
            {"max_processors": 4, "min_wallclock_seconds": 600},
            [lm("a", 3, shutdown_time=T + 500)],
            (4, T + 86400),
        ),
        (
            {"max_processors": 4, "max_wallclock_seconds": 4000},
            [lm("a", 3, shutdown_time=T + 5000)],
            (4, T + 4000),
        ),
        (
            {"max_processors": 4, "max_wallclock_seconds": 4000, "min_wallclock_seconds": 500},
            [lm("a", 3, shutdown_time=T + 500)],
            (1, T + 500),
        ),
        # No incomplete superslot: a new one with min(free, max_processors, pps).
        ({"max_processors": 3}, [lm("a", 4)], (3, T + 86400)),
        ({"max_processors": 8}, [], (4, T + 86400)),
    ],
)
def test_superslots(
    tmp_path: Path,
    options: dict[str, Any],
    running: list[RunningLm],
    expected: tuple[int, int],
) -> None:
    config = make_config(
        tmp_path,
        {"a": {"target_share": 1, "min_wallclock_seconds": 0, **options}},
        total_processors=16,
        processors_per_superslot=4,
    )
    first = decisions(run_plan(config, running, max_starts=1))[0]
    assert (first.processors, first.shutdown_time) == expected


def test_new_superslot_uses_free_processors_when_fewer_than_pps(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        {"a": {"target_share": 1, "max_processors": 4}},
        total_processors=6,
        processors_per_superslot=4,
    )
    result = decisions(run_plan(config))
    assert [d.processors for d in result] == [4, 2]


def test_min_processors_not_fitting_blocks(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        {"a": {"target_share": 1, "min_processors": 4, "max_processors": 4}},
        total_processors=6,
        processors_per_superslot=4,
    )
    assert decisions(run_plan(config, max_starts=1))[0].processors == 4
    result = run_plan(config, [lm("a", 4)])
    assert result == Blocked("no eligible machinetype fits 2 free processors")


def test_reserved_processors_wait_for_their_superslot(tmp_path: Path) -> None:
    """A type too big for the remainder does not take processors an incomplete superslot holds."""
    config = make_config(
        tmp_path,
        {"a": {"target_share": 1, "min_processors": 4, "max_processors": 4}},
        total_processors=8,
        processors_per_superslot=4,
    )
    result = decisions(run_plan(config, [lm("a", 2, shutdown_time=T + 900)]))
    assert [d.processors for d in result] == [4]  # 2 processors stay with the T+900 superslot


def test_multiprocessor_plan_completes_superslots(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        {
            "big": {"target_share": 1, "min_processors": 2, "max_processors": 4},
            "one": {"target_share": 1, "min_wallclock_seconds": 0},
        },
        total_processors=16,
        processors_per_superslot=4,
    )
    result = decisions(run_plan(config))
    assert sum(d.processors for d in result) == 16
    per_superslot = Counter[int]()
    for d in result:
        per_superslot[d.shutdown_time] += d.processors
    assert all(total % 4 == 0 for total in per_superslot.values())


# --- factory shutdown_time and min_wallclock ----------------------------------------------------


def test_new_lm_shutdown_capped_at_factory_shutdown_time(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, {"a": {"target_share": 1, "min_wallclock_seconds": 600}}, shutdown_time=T + 3600
    )
    result = decisions(run_plan(config, max_starts=2))
    assert [d.shutdown_time for d in result] == [T + 3600, T + 3600]


def test_min_wallclock_beyond_factory_shutdown_time_blocks(tmp_path: Path) -> None:
    config = make_config(
        tmp_path,
        {"a": {"target_share": 1, "min_wallclock_seconds": 7200}, "b": {"target_share": 1}},
        shutdown_time=T + 3600,
    )
    assert run_plan(config) == Blocked(
        "no eligible machinetype (a: min_wallclock_seconds beyond shutdown_time; "
        "b: min_wallclock_seconds beyond shutdown_time)"
    )


# --- plan: filling a factory in one pass --------------------------------------------------------


def test_plan_fills_empty_factory_in_one_call(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"a": {"target_share": 1}, "b": {"target_share": 1}})
    result = decisions(run_plan(config, max_starts=64))
    assert len(result) == 64
    assert Counter(d.machinetype for d in result) == {"a": 32, "b": 32}
    assert all(d.processors == 1 and d.shutdown_time == T + 86400 for d in result)
    # The next cycle finds the factory full.
    running = [lm(d.machinetype, started=None, created=NOW) for d in result]
    assert run_plan(config, running) == Blocked("all 64 processors in use")


@pytest.mark.parametrize("max_starts", [0, 1, 10])
def test_plan_respects_max_starts(tmp_path: Path, max_starts: int) -> None:
    config = make_config(tmp_path, {"a": {"target_share": 1}})
    assert len(decisions(run_plan(config, max_starts=max_starts))) == max_starts


@pytest.mark.parametrize(
    ("shares", "total", "expected"),
    [
        ({"a": 3, "b": 1}, 8, {"a": 6, "b": 2}),
        ({"a": 1, "b": 1, "c": 2}, 16, {"a": 4, "b": 4, "c": 8}),
        ({"a": 1, "b": 0}, 4, {"a": 4}),
    ],
)
def test_shares_converge_over_a_plan(
    tmp_path: Path, shares: dict[str, int], total: int, expected: dict[str, int]
) -> None:
    config = make_config(
        tmp_path, {n: {"target_share": s} for n, s in shares.items()}, total_processors=total
    )
    assert Counter(d.machinetype for d in decisions(run_plan(config))) == expected


def test_shares_count_running_lms(tmp_path: Path) -> None:
    config = make_config(
        tmp_path, {"a": {"target_share": 1}, "b": {"target_share": 1}}, total_processors=8
    )
    result = decisions(run_plan(config, [lm("a")] * 4))
    assert Counter(d.machinetype for d in result) == {"b": 4}


def test_plan_probes_a_backed_off_type_with_one_lm(tmp_path: Path) -> None:
    """After backoff only one LM tries the type; the fizzle window then holds the others back."""
    config = make_config(tmp_path, {"a": BACKOFF, "b": {"target_share": 1}}, total_processors=8)
    result = decisions(run_plan(config, histories={"a": TypeHistory(NOW - 200)}))
    assert Counter(d.machinetype for d in result) == {"a": 1, "b": 7}
    result = decisions(run_plan(config, histories={"a": TypeHistory(NOW - 50)}))
    assert Counter(d.machinetype for d in result) == {"b": 8}


def test_plan_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    config = make_config(tmp_path, {n: {"target_share": 1} for n in "abc"}, total_processors=7)
    first = run_plan(config, seed=42)
    assert first == run_plan(config, seed=42)
    orders = {tuple(d.machinetype for d in decisions(run_plan(config, seed=s))) for s in range(10)}
    assert len(orders) > 1


def test_decision_reason_is_short(tmp_path: Path) -> None:
    config = make_config(tmp_path, {"a": {"target_share": 1}})
    assert decisions(run_plan(config, max_starts=1))[0].reason == "score 0.00, new superslot"


# --- property: never over-commit, never an ineligible type, processors in range -----------------


@pytest.fixture(scope="module")
def base_config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return make_config(tmp_path_factory.mktemp("base"), {"base": {"target_share": 1}})


TYPE_NAMES = ("a", "b", "c")


@st.composite
def scenarios(
    draw: st.DrawFn, base: Config
) -> tuple[Config, list[RunningLm], dict[str, TypeHistory]]:
    pps = draw(st.integers(1, 8))
    total = draw(st.integers(1, 64))
    shutdown = draw(st.none() | st.integers(T - 10, T + 200_000))
    mts = {}
    for name in TYPE_NAMES:
        min_p = draw(st.integers(1, 8))
        max_wall = draw(st.integers(60, 100_000))
        mts[name] = replace(
            base.machinetypes["base"],
            name=name,
            target_share=draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])),
            min_processors=min_p,
            max_processors=draw(st.integers(min_p, 8)),
            max_wallclock_seconds=max_wall,
            min_wallclock_seconds=draw(st.none() | st.integers(0, max_wall)),
            backoff_seconds=draw(st.integers(0, 1000)),
            fizzle_seconds=draw(st.integers(0, 1000)),
            machinegroup=draw(st.sampled_from([None, "g"])),
        )
    factory = replace(
        base.factory, processors_per_superslot=pps, total_processors=total, shutdown_time=shutdown
    )
    config = replace(base, factory=factory, machinetypes=mts)
    running: list[RunningLm] = []
    used = 0
    for _ in range(draw(st.integers(0, 12))):
        processors = draw(st.integers(1, pps))
        if used + processors > total:
            break
        used += processors
        started = draw(st.none() | st.floats(NOW - 5000, NOW))
        running.append(
            lm(
                draw(st.sampled_from(TYPE_NAMES)),
                processors,
                shutdown_time=T + draw(st.sampled_from([100, 3000, 50_000])),
                created=NOW - 6000 if started is not None else draw(st.floats(NOW - 5000, NOW)),
                started=started,
            )
        )
    aborts = st.none() | st.floats(NOW - 3000, NOW)
    histories = {name: TypeHistory(draw(aborts)) for name in TYPE_NAMES}
    return config, running, histories


@settings(max_examples=300, deadline=None)
@given(data=st.data(), seed=st.integers(0, 2**32), now_offset=st.floats(0, 0.99))
def test_plan_properties(
    base_config: Config, data: st.DataObject, seed: int, now_offset: float
) -> None:
    config, running, histories = data.draw(scenarios(base_config))
    now = NOW + now_offset
    result = plan(
        config,
        running,
        histories,
        now=now,
        load_average=IDLE,
        counted_cpus=64,
        rng=random.Random(seed),
        max_starts=64,
    )
    if isinstance(result, Blocked):
        return
    pps = config.factory.processors_per_superslot
    working = list(running)
    for d in result:
        mt = config.machinetypes[d.machinetype]
        assert eligible(mt, config, working, histories.get(mt.name), now) is None
        assert mt.min_processors <= d.processors <= min(mt.max_processors, pps)
        assert d.shutdown_time >= int(now) + mt.effective_min_wallclock
        working.append(
            lm(
                d.machinetype,
                d.processors,
                shutdown_time=d.shutdown_time,
                created=now,
                started=None,
            )
        )
    assert sum(x.processors for x in working) <= config.factory.total_processors
