"""LM states, the transition table, shutdown messages and how an outcome is decided (vac.md §7.2,
§3.4)."""

from __future__ import annotations

import itertools
import json

import pytest

from lmrunner.errors import LmrunnerError
from lmrunner.lifecycle import (
    ABORT_CODE,
    ACTIVE,
    TRANSITIONS,
    IllegalTransition,
    LmState,
    Outcome,
    OutcomeSource,
    check_transition,
    decide_outcome,
    heartbeat_outcome,
    operator_outcome,
    parse_shutdown_message,
    start_failed_outcome,
    wallclock_outcome,
)

S = LmState

#: The table written out independently of the module, so a changed TRANSITIONS fails here.
ALLOWED: frozenset[tuple[LmState, LmState]] = frozenset(
    {
        (S.CREATING, S.STARTING),
        (S.CREATING, S.FAILED),
        (S.STARTING, S.RUNNING),
        (S.STARTING, S.STOPPING),
        (S.STARTING, S.FINISHED),
        (S.STARTING, S.FAILED),
        (S.RUNNING, S.STOPPING),
        (S.RUNNING, S.FINISHED),
        (S.STOPPING, S.FINISHED),
    }
)
ALL_PAIRS = list(itertools.product(LmState, repeat=2))


# --- states and transitions -------------------------------------------------------------------


def test_states_and_their_values() -> None:
    assert [s.value for s in LmState] == [
        "creating",
        "starting",
        "running",
        "stopping",
        "finished",
        "failed",
    ]
    assert LmState("running") is S.RUNNING


def test_table_has_a_row_for_every_state() -> None:
    assert set(TRANSITIONS) == set(LmState)


def test_table_is_exactly_the_allowed_pairs() -> None:
    table = {(old, new) for old, targets in TRANSITIONS.items() for new in targets}
    assert table == ALLOWED


@pytest.mark.parametrize(("old", "new"), ALL_PAIRS, ids=[f"{o}-{n}" for o, n in ALL_PAIRS])
def test_every_pair_is_allowed_or_raises(old: LmState, new: LmState) -> None:
    if (old, new) in ALLOWED:
        check_transition(old, new)
    else:
        with pytest.raises(IllegalTransition, match=f"{old} -> {new}"):
            check_transition(old, new)


def test_no_state_transitions_to_itself() -> None:
    for state in LmState:
        with pytest.raises(IllegalTransition):
            check_transition(state, state)


@pytest.mark.parametrize("terminal", [S.FINISHED, S.FAILED])
def test_terminal_states_have_no_way_out(terminal: LmState) -> None:
    assert TRANSITIONS[terminal] == frozenset()
    for new in LmState:
        with pytest.raises(IllegalTransition):
            check_transition(terminal, new)


def test_illegal_transition_is_an_lmrunner_error() -> None:
    assert issubclass(IllegalTransition, LmrunnerError)


def test_active_states_hold_processors() -> None:
    assert frozenset({S.CREATING, S.STARTING, S.RUNNING, S.STOPPING}) == ACTIVE
    # Exactly the states that can still change: the terminal ones are not active.
    assert {state for state, targets in TRANSITIONS.items() if targets} == ACTIVE
    assert S.FINISHED not in ACTIVE
    assert S.FAILED not in ACTIVE


def test_every_active_state_can_reach_an_end() -> None:
    ends = {S.FINISHED, S.FAILED}
    for state in ACTIVE:
        seen: set[LmState] = set()
        todo = [state]
        while todo:
            current = todo.pop()
            seen.add(current)
            todo.extend(TRANSITIONS[current] - seen)
        assert seen & ends, state


# --- shutdown messages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("300 No more work", (300, "No more work")),
        ("200", (200, "")),
        ("100 Shutdown time reached", (100, "Shutdown time reached")),
        ("700 Heartbeat file not updated", (700, "Heartbeat file not updated")),
        ("799 x", (799, "x")),
        ("  300 No more work  \n", (300, "No more work")),
        ("\n\n  200 done\t\n", (200, "done")),
        ("300\tNo more work", (300, "No more work")),
        ("300   spaced   text   ", (300, "spaced   text")),
        ("200 \n", (200, "")),
        ("300 first line\n700 second line\n", (300, "first line")),
        ("500 site problem\r\nmore detail", (500, "site problem")),
        ("600 text with 123 digits", (600, "text with 123 digits")),
    ],
)
def test_parse_good_messages(text: str, expected: tuple[int, str]) -> None:
    assert parse_shutdown_message(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "\n\n",
        "abc",
        "99 x",
        "99",
        "800 x",
        "000 x",
        "099 x",
        "3000 x",
        "3000",
        "30 x",
        "300x",
        "300-x",
        "x 300 text",
        "abc\n300 second line only",
    ],
)
def test_parse_bad_messages(text: str) -> None:
    assert parse_shutdown_message(text) is None


# --- outcomes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "abort"),
    [(100, False), (200, False), (299, False), (300, True), (400, True), (600, True), (700, True)],
)
def test_abort_is_code_300_or_more(code: int, abort: bool) -> None:
    assert Outcome(code, "t", OutcomeSource.PAYLOAD).abort is abort
    assert ABORT_CODE == 300


def test_message_is_code_space_text() -> None:
    assert Outcome(300, "No more work", OutcomeSource.PAYLOAD).message == "300 No more work"
    assert Outcome(200, "", OutcomeSource.PAYLOAD).message == "200 "


def test_message_parses_back() -> None:
    outcome = Outcome(500, "Start failed: no image", OutcomeSource.START_FAILED)
    assert parse_shutdown_message(outcome.message) == (outcome.code, outcome.text)


@pytest.mark.parametrize("source", list(OutcomeSource))
def test_json_round_trip(source: OutcomeSource) -> None:
    outcome = Outcome(700, 'text with ünïcode and "quotes"', source)
    data = outcome.to_json()
    assert data == {"code": 700, "text": outcome.text, "source": source.value}
    assert Outcome.from_json(json.loads(json.dumps(data))) == outcome


def test_from_json_coerces_and_rejects() -> None:
    assert Outcome.from_json({"code": "300", "text": "x", "source": "payload"}) == Outcome(
        300, "x", OutcomeSource.PAYLOAD
    )
    with pytest.raises(ValueError):
        Outcome.from_json({"code": 300, "text": "x", "source": "nobody"})
    with pytest.raises(KeyError):
        Outcome.from_json({"code": 300, "text": "x"})


def test_outcome_is_frozen() -> None:
    outcome = Outcome(200, "ok", OutcomeSource.PAYLOAD)
    with pytest.raises(AttributeError):
        outcome.code = 300  # type: ignore[misc]


def test_heartbeat_outcomes_use_vacs_texts() -> None:
    never = heartbeat_outcome(created=False)
    stale = heartbeat_outcome(created=True)
    assert never.message == "700 Heartbeat file not created"
    assert stale.message == "700 Heartbeat file not updated"
    assert never.source is stale.source is OutcomeSource.HEARTBEAT
    assert never.abort and stale.abort


def test_other_lmrunner_outcomes() -> None:
    assert wallclock_outcome() == Outcome(100, "Shutdown time reached", OutcomeSource.WALLCLOCK)
    assert not wallclock_outcome().abort
    assert operator_outcome(forced=False) == Outcome(
        100, "Stopped by operator", OutcomeSource.OPERATOR
    )
    assert operator_outcome(forced=True) == Outcome(
        100, "Killed by operator", OutcomeSource.OPERATOR
    )
    failed = start_failed_outcome("image not found")
    assert failed == Outcome(500, "Start failed: image not found", OutcomeSource.START_FAILED)
    assert failed.abort


# --- deciding an outcome ----------------------------------------------------------------------

STOP = Outcome(100, "Shutdown time reached", OutcomeSource.WALLCLOCK)


def decide(
    *,
    message: str | None = None,
    stop_reason: Outcome | None = None,
    exit_code: int | None = 0,
    oom_killed: bool = False,
    lost: bool = False,
    lifetime: float | None = 10_000.0,
    fizzle_seconds: int = 600,
    engine_fault: str | None = None,
) -> Outcome:
    return decide_outcome(
        engine_fault=engine_fault,
        message=message,
        stop_reason=stop_reason,
        exit_code=exit_code,
        oom_killed=oom_killed,
        lost=lost,
        lifetime=lifetime,
        fizzle_seconds=fizzle_seconds,
    )


def test_payload_message_wins_over_everything() -> None:
    outcome = decide(
        message="300 No more work\n",
        stop_reason=STOP,
        exit_code=137,
        oom_killed=True,
        lost=True,
        lifetime=1.0,
    )
    assert outcome == Outcome(300, "No more work", OutcomeSource.PAYLOAD)


def test_a_success_message_wins_even_when_the_lm_fizzled() -> None:
    outcome = decide(message="200 Done", exit_code=1, lifetime=1.0)
    assert outcome == Outcome(200, "Done", OutcomeSource.PAYLOAD)
    assert not outcome.abort


@pytest.mark.parametrize("bad", ["", "garbage", "800 x", "3000 x"])
def test_unparsable_message_is_ignored(bad: str) -> None:
    assert decide(message=bad, stop_reason=STOP) == STOP
    assert decide(message=bad, exit_code=0).source is OutcomeSource.EXIT_STATUS


def test_stop_reason_wins_over_oom_lost_fizzle_and_exit() -> None:
    hb = heartbeat_outcome(created=True)
    assert decide(stop_reason=hb, exit_code=137, oom_killed=True, lost=True, lifetime=1.0) == hb


def test_oom_wins_over_lost_fizzle_and_exit() -> None:
    outcome = decide(exit_code=0, oom_killed=True, lost=True, lifetime=1.0)
    assert outcome.source is OutcomeSource.OOM
    assert outcome.code == 700
    assert "OOM" in outcome.text


def test_lost_wins_over_fizzle_and_exit() -> None:
    outcome = decide(exit_code=None, lost=True, lifetime=1.0)
    assert outcome.source is OutcomeSource.LOST
    assert outcome.code == 500
    assert outcome.abort


def test_fizzle_wins_over_a_clean_exit() -> None:
    outcome = decide(exit_code=0, lifetime=5.0, fizzle_seconds=600)
    assert outcome.code == ABORT_CODE
    assert outcome.abort
    assert outcome.source is OutcomeSource.EXIT_STATUS
    assert outcome.text.startswith("Fizzled after 5 s")
    assert "exit status 0" in outcome.text


def test_fizzle_with_unknown_exit_status() -> None:
    outcome = decide(exit_code=None, lifetime=0.0)
    assert outcome.code == ABORT_CODE
    assert "exit status unknown" in outcome.text


@pytest.mark.parametrize(
    ("lifetime", "fizzled"),
    [
        (0.0, True),
        (599.0, True),
        (599.999, True),
        (600.0, False),
        (600.001, False),
        (86_400.0, False),
        (None, False),
    ],
)
def test_fizzle_boundary(lifetime: float | None, fizzled: bool) -> None:
    outcome = decide(exit_code=0, lifetime=lifetime, fizzle_seconds=600)
    if fizzled:
        assert outcome.code == ABORT_CODE
        assert outcome.text.startswith("Fizzled")
    else:
        assert outcome.code == 200


def test_fizzle_seconds_zero_never_fizzles() -> None:
    assert decide(exit_code=0, lifetime=0.0, fizzle_seconds=0).code == 200


@pytest.mark.parametrize(
    ("exit_code", "code"),
    [(0, 200), (1, 700), (139, 700), (None, 700)],
)
def test_exit_status_after_fizzle_seconds(exit_code: int | None, code: int) -> None:
    outcome = decide(exit_code=exit_code, lifetime=3600.0, fizzle_seconds=600)
    assert outcome.code == code
    assert outcome.source is OutcomeSource.EXIT_STATUS
    status = "unknown" if exit_code is None else str(exit_code)
    assert f"status {status}" in outcome.text
    assert "without a shutdown_message" in outcome.text
    assert outcome.abort is (code >= ABORT_CODE)


@pytest.mark.parametrize(("exit_code", "name"), [(137, "SIGKILL"), (143, "SIGTERM")])
def test_a_kill_lmrunner_did_not_send_is_the_sites(exit_code: int, name: str) -> None:
    """Every backend reports a signal death as 128 + N; SIGTERM and SIGKILL come from the host
    or an admin when lmrunner did not stop the LM (its stop reason would win)."""
    outcome = decide(exit_code=exit_code, lifetime=3600.0, fizzle_seconds=600)
    assert (outcome.code, outcome.source) == (500, OutcomeSource.LOST)
    assert outcome.text.startswith(
        f"Stopped from outside lmrunner (exit status {exit_code}: {name}"
    )
    assert decide(exit_code=exit_code, oom_killed=True).source is OutcomeSource.OOM
    stopped = decide(exit_code=exit_code, stop_reason=wallclock_outcome())
    assert stopped == wallclock_outcome()


def test_an_engine_fault_is_a_site_problem() -> None:
    outcome = decide(exit_code=0, engine_fault="Docker daemon restarted while the LM ran")
    assert outcome == Outcome(500, "Docker daemon restarted while the LM ran", OutcomeSource.LOST)


def test_an_empty_message_counts_as_no_message() -> None:
    assert decide(message=None, exit_code=0) == decide(message="", exit_code=0)


def test_a_700_written_after_an_oom_kill_gives_way_to_the_oom() -> None:
    # An init (vcbusybox's) reports its OOM-killed child as "700 Payload exited with status 137".
    outcome = decide_outcome(
        message="700 Payload exited with status 137\n", stop_reason=None, exit_code=137,
        oom_killed=True, lost=False, lifetime=100.0, fizzle_seconds=10,
    )  # fmt: skip
    assert outcome.source is OutcomeSource.OOM
    other = decide_outcome(
        message="300 No more work", stop_reason=None, exit_code=137, oom_killed=True,
        lost=False, lifetime=100.0, fizzle_seconds=10,
    )  # fmt: skip
    assert other.source is OutcomeSource.PAYLOAD
