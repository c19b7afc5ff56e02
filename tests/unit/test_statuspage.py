"""The read-only status page, rendered from a real store with a fake clock and fake live usage;
the day's series behind its three plots; the store's timeline and last ends it reads (schema 4
indexes)."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from lmrunner.config import Config
from lmrunner.lifecycle import LmState, Outcome, OutcomeSource
from lmrunner.state import DB_NAME, MIGRATIONS, SCHEMA_VERSION, LmRecord, Store
from lmrunner.statuspage import BINS, CLASSES, DAY, RECENT, Live, StatusPage, day_series, live
from lmrunner.vacquery.space import SpaceView
from tests.unit.test_factory import HOST, LONG, T0, Clock, Env, bare_record

NOW = float(T0)
HOUR = DAY / BINS
START = NOW - DAY
SECRET_USER_DATA = "SECRET-IN-THE-USER-DATA-FILE"
SECRET_OPTION = "SECRET-USER-DATA-OPTION-VALUE"
SECRET_FACTORY_OPTION = "SECRET-FACTORY-OPTION-VALUE"
HOSTILE = "<script>x</script> & \"quoted\" 'single'"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    made = Env(tmp_path)
    yield made
    made.close()


def make_config(env: Env, **factory: Any) -> Config:
    files = env.state_dir / "machinetypes" / "alpha" / "files"
    files.mkdir(parents=True, exist_ok=True)
    (files / "user_data").write_text(f"#!/bin/sh\necho {SECRET_USER_DATA}\n")
    kind = {"backend": "fake", "image": LONG, "fizzle_seconds": 0}
    return env.config(
        cpus=2,
        check_files=False,  # the user_data file is there; a state_dir elsewhere has none
        factory={
            "disk_method": "none",
            "user_data_options": {"factory_token": SECRET_FACTORY_OPTION},
            **factory,
        },
        machinetypes={
            "alpha": {
                **kind,
                "target_share": 1,
                "backoff_seconds": 600,
                "user_data": "user_data",
                "user_data_options": {"token": SECRET_OPTION},
            },
            "beta": {**kind, "target_share": 3},
        },
    )


@pytest.fixture
def config(env: Env) -> Config:
    return make_config(env)


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


def lm(env: Env, slot: int, uuid: str, **changes: Any) -> LmRecord:
    return replace(bare_record(env, slot, uuid), **changes)


def running(env: Env, slot: int, uuid: str, **changes: Any) -> LmRecord:
    values: dict[str, Any] = {"state": LmState.RUNNING, "started": NOW - 100, **changes}
    return lm(env, slot, uuid, **values)


def ended(env: Env, slot: int, uuid: str, code: int, text: str, **changes: Any) -> LmRecord:
    values: dict[str, Any] = {
        "state": LmState.FINISHED,
        "started": NOW - 500,
        "finished": NOW - 60,
        "outcome": Outcome(code, text, OutcomeSource.PAYLOAD),
        **changes,
    }
    return lm(env, slot, uuid, **values)


def no_usage(record: LmRecord) -> Live:
    return Live(None, None, None)


def render(config: Config, clock: Clock, **options: Any) -> str:
    page = StatusPage(lambda: config, clock=clock, **{"usage": no_usage, **options})
    return page().decode()


class Tags(HTMLParser):
    """Start and end tags, and the text, of a document."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.starts: list[str] = []
        self.ends: list[str] = []
        self.text: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.starts.append(tag)
        self.attributes.extend(attrs)

    def handle_endtag(self, tag: str) -> None:
        self.ends.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(document: str) -> Tags:
    tags = Tags()
    tags.feed(document)
    tags.close()
    return tags


def section(document: str, title: str) -> str:
    """The HTML of one h2 section (up to the next h2)."""
    begin = document.index(f"<h2>{title}</h2>")
    end = document.find("<h2>", begin + 1)
    return document[begin : end if end >= 0 else len(document)]


# --- the page --------------------------------------------------------------------------------


def test_the_page_shows_the_factory_its_types_its_lms_and_their_ends(
    env: Env, config: Config, clock: Clock
) -> None:
    env.store.insert_many(
        [
            running(env, 0, "u0"),
            running(env, 1, "u1", machinetype="beta", processors=1),
            ended(env, 2, "u2", 200, "Intended work completed ok", created=NOW - 900),
        ]
    )
    page = StatusPage(lambda: config, clock=clock, usage=no_usage)
    data = page()
    assert isinstance(data, bytes)
    document = data.decode()
    assert document.startswith("<!DOCTYPE html>")
    assert f"<title>lmrunner {HOST}</title>" in document
    assert f"<h1>{HOST}</h1>" in document
    assert "<td>space.example.com</td>" in document
    assert "<td>2 of 2 in use by 2 LMs</td>" in document
    assert "<th>starting new LMs</th><td>yes</td>" in document
    types = section(document, "Machinetypes")
    assert "<td>alpha</td><td>fake</td><td>1</td><td>1</td><td>1</td><td>-</td>" in types
    assert "<td>beta</td><td>fake</td><td>3</td><td>1</td><td>1</td><td>-</td><td>-</td>" in types
    assert "<td>200 Intended work completed ok (60 s ago)</td>" in types
    lms = section(document, "Running LMs")
    assert "<td>factory-00.example.com</td><td>alpha</td><td>fake</td><td>running</td>" in lms
    assert "<td>factory-01.example.com</td><td>beta</td>" in lms
    assert "factory-02.example.com" not in lms
    ends = section(document, "Recent ends")
    assert "<td>factory-02.example.com</td><td>alpha</td><td>fake</td><td>60 s ago</td>" in ends
    assert "<td>7 min</td><td>200 Intended work completed ok</td>" in ends


def test_the_page_is_self_contained_html_with_three_plots(
    env: Env, config: Config, clock: Clock
) -> None:
    env.store.insert(running(env, 0, "u0"))
    document = render(config, clock)
    assert document.count("<svg") == 3
    assert document.count("</svg>") == 3
    assert "<script" not in document.lower()
    assert "javascript:" not in document.lower()
    tags = parse(document)
    assert "script" not in tags.starts
    assert "link" not in tags.starts
    assert "img" not in tags.starts
    assert "iframe" not in tags.starts
    names = {name for name, _ in tags.attributes}
    assert not names & {"src", "href", "onload", "onclick", "onerror", "style"}
    for tag in ("table", "tr", "svg", "figure", "details", "html", "body", "h1", "h2"):
        assert tags.starts.count(tag) == tags.ends.count(tag), tag
    assert '<meta http-equiv=refresh content="60">' in document
    assert document.count("<figure>") == 3


def test_outcome_texts_and_names_are_escaped(env: Env, config: Config, clock: Clock) -> None:
    env.store.insert_many(
        [
            ended(env, 0, "u0", 300, HOSTILE, created=NOW - 900, finished=NOW - 30),
            running(env, 1, "u1", name='evil<b>&"name', machinetype='<b>type&"'),
        ]
    )
    document = render(config, clock)
    assert "<script>" not in document
    assert "<b>" not in document
    escaped = "&lt;script&gt;x&lt;/script&gt; &amp; &quot;quoted&quot; &#x27;single&#x27;"
    assert f"<td>300 {escaped} (30 s ago)</td>" in section(document, "Machinetypes")
    assert f"<td>300 {escaped}</td>" in section(document, "Recent ends")
    lms = section(document, "Running LMs")
    assert "<td>evil&lt;b&gt;&amp;&quot;name</td><td>&lt;b&gt;type&amp;&quot;</td>" in lms
    text = "".join(parse(document).text)
    assert HOSTILE in text  # shown as text, exactly


def test_no_user_data_or_its_options_are_shown(env: Env, config: Config, clock: Clock) -> None:
    assert config.machinetypes["alpha"].user_data_options["token"] == SECRET_OPTION
    env.store.insert_many([running(env, 0, "u0"), ended(env, 1, "u1", 200, "ok")])
    document = render(config, clock)
    for secret in (SECRET_USER_DATA, SECRET_OPTION, SECRET_FACTORY_OPTION):
        assert secret not in document


def test_a_store_that_cannot_be_read_gives_a_page_saying_so(env: Env, clock: Clock) -> None:
    elsewhere = env.tmp_path / "no-store-here"
    elsewhere.mkdir()
    config = make_config(env, state_dir=str(elsewhere))
    page = StatusPage(lambda: config, clock=clock, usage=no_usage)
    document = page().decode()
    assert document.startswith("<!DOCTYPE html>")
    assert "The state store cannot be read: " in document
    assert "<svg" not in document
    assert not (elsewhere / DB_NAME).exists()  # read-only: it made none
    store = Store(elsewhere)  # the daemon makes it: the next page is whole again
    try:
        store.insert(running(env, 0, "u0"))
        document = page().decode()
    finally:
        store.close()
    assert "cannot be read" not in document
    assert "factory-00.example.com" in document
    assert document.count("<svg") == 3


def test_a_store_of_another_schema_gives_a_page_saying_so(env: Env, clock: Clock) -> None:
    elsewhere = env.tmp_path / "old-store"
    elsewhere.mkdir()
    with sqlite3.connect(elsewhere / DB_NAME) as db:
        db.execute("PRAGMA user_version=1")
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.close()
    config = make_config(env, state_dir=str(elsewhere))
    document = render(config, clock)
    assert "The state store cannot be read: " in document
    assert f"expected {SCHEMA_VERSION}" in document


def test_a_file_that_is_no_database_gives_a_page_saying_so(env: Env, clock: Clock) -> None:
    elsewhere = env.tmp_path / "garbled"
    elsewhere.mkdir()
    (elsewhere / DB_NAME).write_bytes(b"this is not an SQLite database" * 100)
    config = make_config(env, state_dir=str(elsewhere))
    document = render(config, clock)
    assert "The state store cannot be read: " in document
    assert "<script" not in document


def test_an_empty_factory(env: Env, config: Config, clock: Clock) -> None:
    document = render(config, clock)
    assert "<td>0 of 2 in use by 0 LMs</td>" in document
    assert "<h2>Running LMs</h2><p class=none>none</p>" in document
    assert "<h2>Recent ends</h2><p class=none>none</p>" in document
    assert document.count("<svg") == 3


def test_draining_is_shown_from_the_store_or_the_config(
    env: Env, config: Config, clock: Clock
) -> None:
    env.store.set_meta("draining", "1")
    assert "<th>starting new LMs</th><td>no: draining</td>" in render(config, clock)
    env.store.set_meta("draining", None)
    assert "<th>starting new LMs</th><td>yes</td>" in render(config, clock)
    drained = make_config(env, draining=True)
    assert "<th>starting new LMs</th><td>no: draining</td>" in render(drained, clock)


def test_backoff_is_shown_until_it_ends(env: Env, config: Config, clock: Clock) -> None:
    env.store.insert(ended(env, 0, "u0", 301, "no work", finished=NOW - 100))
    types = section(render(config, clock), "Machinetypes")
    assert "<td>until 2023-11-14 22:21 UTC</td>" in types  # NOW - 100 + 600
    clock.now = NOW + 500
    assert "<td>until" not in section(render(config, clock), "Machinetypes")


def test_the_space_is_summarised(env: Env, config: Config, clock: Clock) -> None:
    view = SpaceView(taken=NOW - 30, answered=("a", "b"), silent=("c",))
    document = render(config, clock, space=lambda: view)
    assert "<th>other factories</th><td>2 answered, 1 silent (30 s ago)</td>" in document
    assert "other factories" not in render(config, clock)


def test_live_usage_of_running_lms(env: Env, config: Config, clock: Clock) -> None:
    env.store.insert_many(
        [
            running(env, 0, "u0", started=NOW - 100, processors=1),
            running(env, 1, "u1", started=None, state=LmState.STARTING),
        ]
    )

    def usage(record: LmRecord) -> Live:
        if record.uuid == "u0":
            return Live(cpu_seconds=50.0, memory_bytes=3 << 30, disk_bytes=1536)
        return Live(cpu_seconds=1.0, memory_bytes=500, disk_bytes=None)

    lms = section(render(config, clock, usage=usage), "Running LMs")
    assert "<td>1</td><td>100 s</td><td>50%</td><td>3.0 GiB</td><td>1.5 KiB</td>" in lms
    assert "<td>starting</td><td>1</td><td>-</td><td>-</td><td>500 B</td><td>-</td>" in lms


def test_the_real_live_usage_of_an_unmeasured_lm(env: Env) -> None:
    record = running(env, 0, "u0", cgroup="not a cgroup", disk='{"mount": "/nonexistent/x"}')
    assert live(record) == Live(None, None, None)
    assert live(running(env, 0, "u0")) == Live(None, None, None)


def test_recent_ends_are_the_last_ones_newest_first(env: Env, config: Config, clock: Clock) -> None:
    env.store.insert_many(
        [
            ended(env, i, f"u{i:02d}", 200, f"end {i}", created=NOW - 3000 + i,
                  finished=NOW - 1000 + i * 10, name=f"lm-{i:02d}")
            for i in range(RECENT + 5)
        ]
    )  # fmt: skip
    ends = section(render(config, clock), "Recent ends")
    shown = re.findall(r"<td>(lm-\d\d)</td>", ends)
    assert shown == [f"lm-{i:02d}" for i in range(RECENT + 4, 4, -1)]


def test_the_plots_numbers_are_in_tables(env: Env, config: Config, clock: Clock) -> None:
    env.store.insert(running(env, 0, "u0", started=START - 10, created=START - 20, processors=2))
    document = render(config, clock)
    assert "<tr><th>processors</th>" + "<td>2</td>" * BINS + "</tr>" in document
    assert "<tr><th>started</th>" + "<td>0</td>" * BINS + "</tr>" in document
    for label, _low, _high in CLASSES:
        assert f"<tr><th>{label}</th>" + "<td>0</td>" * BINS + "</tr>" in document
    assert "<figcaption>Processors in use, hourly mean (of 2; 2 now)</figcaption>" in document


# --- day_series --------------------------------------------------------------------------------


def row(
    started: float | None, finished: float | None, code: int | None = None, processors: int = 1
) -> dict[str, object]:
    return {
        "machinetype": "alpha",
        "processors": processors,
        "created": (started or NOW) - 5,
        "started": started,
        "finished": finished,
        "code": code,
    }


def test_an_lm_running_the_whole_day_uses_its_processors_every_hour() -> None:
    starts, ends, busy = day_series([row(NOW - 2 * DAY, None, processors=4)], NOW)
    assert busy == [4.0] * BINS
    assert starts == [0] * BINS
    assert ends == [[0] * BINS for _ in CLASSES]


def test_an_lm_started_and_ended_within_one_hour() -> None:
    began = START + 5 * HOUR + 600
    starts, ends, busy = day_series([row(began, began + 1800, 200, processors=2)], NOW)
    assert starts == [1 if i == 5 else 0 for i in range(BINS)]
    assert ends[0] == [1 if i == 5 else 0 for i in range(BINS)]
    assert all(sum(series) == 0 for series in ends[1:])
    assert busy == [pytest.approx(1.0) if i == 5 else 0.0 for i in range(BINS)]  # 2 x half


def test_busy_is_split_over_the_hours_an_lm_spans() -> None:
    began = START + 2 * HOUR + 2700  # the last quarter of hour 2
    _starts, _ends, busy = day_series([row(began, began + 900 + HOUR + 1800, 300)], NOW)
    assert busy[:2] == [0.0, 0.0]
    assert busy[2:5] == [pytest.approx(0.25), pytest.approx(1.0), pytest.approx(0.5)]
    assert sum(busy[5:]) == 0


@pytest.mark.parametrize(
    ("code", "index"),
    [(200, 0), (299, 0), (300, 1), (399, 1), (400, 2), (500, 2), (799, 2), (None, 3), (100, 3),
     (800, 3)],
)  # fmt: skip
def test_ends_are_classed_by_their_code(code: int | None, index: int) -> None:
    _starts, ends, _busy = day_series([row(NOW - 1000, NOW - 10, code)], NOW)
    for cls, series in enumerate(ends):
        assert sum(series) == (1 if cls == index else 0)
        assert series[-1] == (1 if cls == index else 0)


def test_rows_older_than_a_day_are_ignored() -> None:
    old = [row(NOW - 3 * DAY, NOW - 2 * DAY, 200), row(NOW - DAY - 100, NOW - DAY - 1, 500)]
    starts, ends, busy = day_series(old, NOW)
    assert starts == [0] * BINS
    assert ends == [[0] * BINS for _ in CLASSES]
    assert busy == [0.0] * BINS


def test_the_edges_of_the_day() -> None:
    rows = [
        row(START, START + 1, 200),  # the first moment: hour 0
        row(NOW, None),  # just now: the last hour
        row(NOW + 50, None),  # a clock that went back: the last hour too
        row(START - 100, START, 500),  # ended at the first moment: counted, no start
    ]
    starts, ends, busy = day_series(rows, NOW)
    assert starts[0] == 1
    assert starts[-1] == 2
    assert sum(starts) == 3
    assert ends[0][0] == 1
    assert ends[2][0] == 1
    assert busy[0] == pytest.approx(1 / HOUR)


def test_an_lm_not_started_yet_uses_nothing() -> None:
    starts, _ends, busy = day_series([row(None, None)], NOW)
    assert sum(starts) == 0
    assert busy == [0.0] * BINS


def test_other_bin_counts() -> None:
    starts, ends, busy = day_series([row(NOW - 2 * DAY, None, processors=1)], NOW, bins=4)
    assert busy == [1.0] * 4
    assert starts == [0] * 4
    assert len(ends[0]) == 4


# --- the store's timeline and last ends ---------------------------------------------------------


def test_the_timeline_holds_the_lms_of_the_day(env: Env) -> None:
    before = {"created": START - 900, "started": START - 800}
    env.store.insert_many(
        [
            ended(env, 0, "old", 200, "old", finished=START - 1, **before),
            ended(env, 1, "spans", 300, "x", finished=START + 60, **before),
            running(env, 2, "long", **before),
            ended(
                env, 3, "new", 500, "y", created=NOW - 300, started=NOW - 200, finished=NOW - 100
            ),
            running(env, 4, "young", created=NOW - 50, started=NOW - 40, processors=2),
            lm(env, 5, "failed", state=LmState.FAILED, created=START - 900, finished=None),
        ]
    )
    rows = env.store.timeline(START)
    assert all(isinstance(r, sqlite3.Row) for r in rows)
    got = sorted(
        (r["created"], r["started"], r["finished"] or 0.0, r["code"] or 0, r["processors"])
        for r in rows
    )
    assert got == sorted(
        [
            (START - 900, START - 800, START + 60, 300, 1),
            (START - 900, START - 800, 0.0, 0, 1),
            (NOW - 300, NOW - 200, NOW - 100, 500, 1),
            (NOW - 50, NOW - 40, 0.0, 0, 2),
        ]
    )
    keys = {"machinetype", "processors", "created", "started", "finished", "code"}
    assert set(rows[0].keys()) == keys
    starts, ends, busy = day_series(rows, NOW)
    assert sum(starts) == 2
    assert [sum(series) for series in ends] == [0, 1, 1, 0]
    assert busy[0] == pytest.approx(1 + 60 / HOUR)  # the long one and a minute of the spanning one
    assert busy[-1] == pytest.approx(1 + 100 / HOUR + 2 * 40 / HOUR)


def test_last_ended_is_newest_first_and_limited(env: Env) -> None:
    env.store.insert_many(
        [running(env, 0, "active")]
        + [
            ended(env, i, f"e{i}", 200 + i, f"t{i}", created=NOW - 900 + i,
                  finished=NOW - 500 + 7 * i)
            for i in range(1, 6)
        ]
    )  # fmt: skip
    rows = env.store.last_ended(3)
    assert [r["finished"] for r in rows] == [NOW - 500 + 35, NOW - 500 + 28, NOW - 500 + 21]
    assert set(rows[0].keys()) == {
        "name", "machinetype", "backend", "processors", "started", "finished", "outcome",
    }  # fmt: skip
    assert '"code": 205' in rows[0]["outcome"]
    assert len(env.store.last_ended(100)) == 5
    assert env.store.last_ended(0) == []


def indexes(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    db.close()
    return names


def test_schema_4_indexes_lms_by_created_and_finished(env: Env) -> None:
    assert SCHEMA_VERSION >= 4
    assert {"lms_created", "lms_finished"} <= indexes(env.state_dir / DB_NAME)
    with sqlite3.connect(env.state_dir / DB_NAME) as db:
        plan = " ".join(
            str(r[-1])
            for r in db.execute(
                "EXPLAIN QUERY PLAN SELECT name FROM lms WHERE finished IS NOT NULL "
                "ORDER BY finished DESC LIMIT 5"
            )
        )
    db.close()
    assert "lms_finished" in plan


def test_a_schema_3_store_gains_the_indexes(tmp_path: Path) -> None:
    state_dir = tmp_path / "v3"
    state_dir.mkdir()
    db = sqlite3.connect(state_dir / DB_NAME, isolation_level=None)
    try:
        db.execute("BEGIN")
        for step in MIGRATIONS[:3]:
            step(db)
        db.execute("PRAGMA user_version=3")
        db.execute("COMMIT")
    finally:
        db.close()
    assert not {"lms_created", "lms_finished"} & indexes(state_dir / DB_NAME)
    Store(state_dir).close()
    assert {"lms_created", "lms_finished"} <= indexes(state_dir / DB_NAME)
    reader = Store(state_dir, readonly=True)
    try:
        assert reader.schema_version() == SCHEMA_VERSION
        assert reader.timeline(0) == []
        assert reader.last_ended(5) == []
    finally:
        reader.close()
