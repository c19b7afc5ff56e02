"""``lmrunner accounting`` and ``lmrunner apel-sync``, run in-process on a store in tmp_path."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from lmrunner import apel
from lmrunner import loader as config_mod
from lmrunner.accounting import AccountingRecord, Flag
from lmrunner.cli import main
from lmrunner.cli.accounting import parse_when
from lmrunner.errors import LmrunnerError
from lmrunner.state import Store
from tests.unit.test_apel import parse_apel

NOW = time.time()
HOUR = 3600.0
CONFIG = """\
factory:
  space: vac01.example.com
  hostname: factory1.example.com
  state_dir: {state}
  total_processors: 4
{extra}"""


@pytest.fixture(autouse=True)
def _this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LMRUNNER_CONFIG", raising=False)
    monkeypatch.setattr("socket.getfqdn", lambda: "factory1.example.com")
    monkeypatch.setattr(config_mod, "usable_cpus", lambda: 4)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def run(*argv: object) -> int:
    return main([str(a) for a in argv])


def record(uuid: str, **changes: Any) -> AccountingRecord:
    finished = changes.pop("finished", NOW - HOUR)
    wall = changes.pop("wall_seconds", 2 * HOUR)
    values: dict[str, Any] = {
        "uuid": uuid,
        "name": f"lm-{uuid}",
        "machinetype": "lhcb",
        "backend": "fake",
        "fqan": "/lhcb/Role=pilot",
        "vo": "lhcb",
        "processors": 2,
        "hs06": 10.0,
        "created": finished - wall - 10,
        "started": finished - wall,
        "finished": finished,
        "wall_seconds": wall,
        "cpu_seconds": 3 * HOUR,
        "memory_peak_bytes": 1 << 30,
        "oom_kills": 0,
        "outcome_code": 200,
        "outcome_text": "Intended work completed ok",
        "outcome_source": "payload",
        "flags": frozenset(),
    }
    values.update(changes)
    return AccountingRecord(**values)


@pytest.fixture
def filled(state: Path) -> Path:
    """Four LMs: two lhcb (one measured, one not), one atlas short one, one without VO."""
    store = Store(state)
    for one in (
        record("a"),
        record("b", cpu_seconds=None, memory_peak_bytes=None, flags=frozenset({Flag.UNMEASURED})),
        record(
            "c",
            machinetype="atlas",
            fqan="/atlas",
            vo="atlas",
            processors=1,
            hs06=None,
            wall_seconds=60.0,
            cpu_seconds=30.0,
            flags=frozenset({Flag.SHORT, Flag.OOM}),
            finished=NOW - 10 * 86400,
        ),
        record(
            "d",
            machinetype="test",
            fqan=None,
            vo=None,
            started=None,
            wall_seconds=0.0,
            cpu_seconds=None,
            flags=frozenset({Flag.FAILED, Flag.UNMEASURED}),
        ),
    ):
        assert store.add_accounting(one)
    store.close()
    return state


# --- lmrunner accounting ----------------------------------------------------------------------


def test_json_totals_per_machinetype_and_vo(
    filled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("accounting", "--state-dir", filled, "--json") == 0
    document = json.loads(capsys.readouterr().out)
    assert document["schema"] == "lmrunner.accounting/1"
    assert document["since"] is None
    assert set(document) == {
        "schema",
        "factory",
        "generated",
        "since",
        "total",
        "machinetypes",
        "vos",
    }
    lhcb = document["machinetypes"]["lhcb"]
    assert lhcb == {
        "lms": 2,
        "wall_hours": pytest.approx(4.0),
        "cpu_hours": pytest.approx(3.0),  # measured CPU only
        "efficiency": pytest.approx(3.0 / (2.0 * 2)),  # of the measured LM only
        "hs06_hours": pytest.approx(2 * 2.0 * 2 * 10.0),
        "flags": {"short": 0, "failed": 0, "oom": 0, "unmeasured": 1},
    }
    assert sorted(document["machinetypes"]) == ["atlas", "lhcb", "test"]
    assert sorted(document["vos"]) == ["-", "atlas", "lhcb"]
    assert document["vos"]["-"]["flags"] == {"short": 0, "failed": 1, "oom": 0, "unmeasured": 1}
    assert document["vos"]["-"]["efficiency"] is None  # nothing measured: no efficiency
    atlas = document["vos"]["atlas"]
    assert atlas["hs06_hours"] == pytest.approx(60 / 3600)  # 1 processor x 1.0 HS06 unset
    assert atlas["flags"] == {"short": 1, "failed": 0, "oom": 1, "unmeasured": 0}
    total = document["total"]
    assert total["lms"] == 4
    assert total["cpu_hours"] == pytest.approx(3.0 + 30 / 3600)
    assert total["efficiency"] == pytest.approx((3 * HOUR + 30) / (2 * HOUR * 2 + 60))


def test_table(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("accounting", "--state-dir", filled) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "4 finished LMs (all recorded)"
    header = ["LMS", "WALL_H", "CPU_H", "EFF%", "HS06_H", "SHORT", "FAILED", "OOM", "UNMEASURED"]
    assert lines[2].split() == ["MACHINETYPE", *header]
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:7]}
    assert rows["lhcb"] == ["2", "4.00", "3.00", "75.0", "80.00", "0", "0", "0", "1"]
    assert rows["test"] == ["1", "0.00", "0.00", "-", "0.00", "0", "1", "0", "1"]
    assert rows["TOTAL"][0] == "4"
    assert lines[7] == ""  # the second table follows a blank line
    vo_header = 8
    assert lines[vo_header].split() == ["VO", *header]
    assert lines[vo_header + 1].split()[0] == "-"
    # Numbers are right-aligned in columns.
    assert len({len(line) for line in lines[2:7]}) == 1


@pytest.mark.parametrize(
    ("since", "lms"),
    [("7d", 3), ("1d12h", 3), ("11d", 4), ("30m", 0), ("90s", 0), ("2w", 4)],
)
def test_since_durations(
    filled: Path, capsys: pytest.CaptureFixture[str], since: str, lms: int
) -> None:
    assert run("accounting", "--state-dir", filled, "--json", "--since", since) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["total"]["lms"] == lms
    assert document["since"] == pytest.approx(parse_when(since, document["generated"]), abs=5)


def test_since_iso_dates_are_utc(filled: Path, capsys: pytest.CaptureFixture[str]) -> None:
    day = datetime.fromtimestamp(NOW - 5 * 86400, UTC).strftime("%Y-%m-%d")
    assert run("accounting", "--state-dir", filled, "--since", day) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"3 LMs finished since {day} 00:00:00 UTC"


def test_parse_when() -> None:
    now = 1_700_000_000.0
    assert parse_when("7d", now) == now - 7 * 86400
    assert parse_when("12h", now) == now - 12 * 3600
    assert parse_when("1w2d3h4m5s", now) == now - (604800 + 2 * 86400 + 3 * 3600 + 4 * 60 + 5)
    assert parse_when("2024-05-01", now) == datetime(2024, 5, 1, tzinfo=UTC).timestamp()
    assert (
        parse_when("2024-05-01T12:30", now) == datetime(2024, 5, 1, 12, 30, tzinfo=UTC).timestamp()
    )
    assert parse_when("2024-05-01 12:30:00+02:00", now) == (
        datetime(2024, 5, 1, 10, 30, tzinfo=UTC).timestamp()
    )
    assert parse_when("2024-05-01T12:30:00Z", now) == (
        datetime(2024, 5, 1, 12, 30, tzinfo=UTC).timestamp()
    )
    for bad in ("7", "d", "7 days", "-7d", "7y", "2024-13-01", "yesterday", ""):
        with pytest.raises(LmrunnerError, match="--since"):
            parse_when(bad, now)


def test_bad_since_is_one_line_naming_the_value(
    filled: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("accounting", "--state-dir", filled, "--since", "last week") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("lmrunner: --since 'last week': expected an ISO date")


def test_accounting_without_a_store_fails(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("accounting", "--state-dir", state) == 1
    assert "no state database" in capsys.readouterr().err
    assert not state.exists()  # read-only: nothing created


def test_accounting_of_an_empty_store(state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Store(state).close()
    assert run("accounting", "--state-dir", state, "--json") == 0
    document = json.loads(capsys.readouterr().out)
    assert document["total"]["lms"] == 0
    assert document["total"]["efficiency"] is None
    assert document["machinetypes"] == {} and document["vos"] == {}
    assert run("accounting", "--state-dir", state) == 0
    assert capsys.readouterr().out.startswith("0 finished LMs")


# --- lmrunner apel-sync -------------------------------------------------------------------------


def site_config(tmp_path: Path, state: Path, extra: str = "") -> Path:
    path = tmp_path / "lmrunner.yaml"
    path.write_text(CONFIG.format(state=state, extra=extra))
    return path


def test_apel_sync_writes_the_months_asked(
    tmp_path: Path, state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = site_config(tmp_path, state, "  gocdb_sitename: UKI-EXAMPLE\n")
    config = config_mod.load_config(path, check_files=False)
    apel.write_job(
        record("a", finished=datetime(2024, 5, 3, tzinfo=UTC).timestamp()), config.factory
    )
    assert run("apel-sync", "--config", path, "202405", "202404") == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2
    messages = [parse_apel(Path(p).read_text())[1][0] for p in printed]
    assert [(m["Year"], m["Month"], m["NumberOfJobs"]) for m in messages] == [
        ("2024", "5", "1"),
        ("2024", "4", "0"),
    ]
    assert all(Path(p).parent.parent == state / apel.OUTGOING for p in printed)


def test_apel_sync_defaults_to_the_month_24_hours_ago(
    tmp_path: Path, state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = site_config(tmp_path, state, "  gocdb_sitename: UKI-EXAMPLE\n")
    assert run("apel-sync", "--config", path) == 0
    [printed] = capsys.readouterr().out.splitlines()
    fields = parse_apel(Path(printed).read_text())[1][0]
    year, month = apel.default_month(time.time())
    assert (fields["Year"], fields["Month"]) == (str(year), str(month))


def test_apel_sync_bad_month_is_one_line(
    tmp_path: Path, state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = site_config(tmp_path, state, "  gocdb_sitename: UKI-EXAMPLE\n")
    assert run("apel-sync", "--config", path, "202405", "2024-5") == 1
    captured = capsys.readouterr()
    assert captured.err == "lmrunner: bad month '2024-5': expected YYYYMM such as 202405\n"
    assert captured.out == ""
    assert not (state / apel.OUTGOING).exists()  # nothing written for the good one either


def test_apel_sync_without_gocdb_sitename_fails(
    tmp_path: Path, state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("apel-sync", "--config", site_config(tmp_path, state)) == 1
    assert "gocdb_sitename is not set" in capsys.readouterr().err
