"""The daemon's read-only status page (``/`` on ``factory.metrics_listen``).

One HTML document, made on the server from the store: the factory, its machinetypes (share,
what runs, backoff, last outcome), the running LMs with their live CPU, memory and disk, the
last ends, and three small plots of the last day (starts, ends by outcome, processors in use)
drawn as inline SVG. No JavaScript and no external assets: it works offline, on a phone and in a
terminal browser (every plot has its numbers in a table beside it). It reloads itself every
minute. It shows names, numbers and outcome texts only: never user_data, keys or secrets.
"""

from __future__ import annotations

import html
import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmrunner import __version__, planning
from lmrunner.cgroups.base import CgroupRef, live_usage
from lmrunner.config import Config
from lmrunner.errors import CgroupError
from lmrunner.state import LmRecord, Store, StoreError
from lmrunner.vacquery.space import SpaceView

DAY = 86400.0
BINS = 24  # the plots' hours
RECENT = 20  # ends listed
REFRESH_SECONDS = 60
#: Outcome classes of the ends plot, by shutdown_message code (a class per hundred).
CLASSES = (
    ("2xx done", 200, 300),
    ("3xx no work", 300, 400),
    ("4xx-7xx trouble", 400, 800),
    ("other", -1, -1),
)
COLOURS = ("#2e7d32", "#f9a825", "#c62828", "#757575")


@dataclass(frozen=True)
class Live:
    """A running LM's usage now (None: not measured)."""

    cpu_seconds: float | None
    memory_bytes: int | None
    disk_bytes: int | None


def live(record: LmRecord) -> Live:
    """CPU and memory from the LM's cgroup, disk from its own filesystem."""
    cpu = memory = disk = None
    if record.cgroup is not None:
        try:
            usage = live_usage(CgroupRef.from_json(record.cgroup))
        except (CgroupError, ValueError):
            usage = None
        if usage is not None:
            cpu, memory = usage
    if record.disk is not None:
        try:
            mount = json.loads(record.disk).get("mount")
            if mount and os.path.ismount(mount):
                info = os.statvfs(mount)
                disk = (info.f_blocks - info.f_bfree) * info.f_frsize
        except (OSError, ValueError, AttributeError):
            disk = None
    return Live(cpu, memory, disk)


class StatusPage:
    """Renders the page from the store (a connection of its own per page)."""

    def __init__(
        self,
        config: Callable[[], Config],
        space: Callable[[], SpaceView | None] = lambda: None,
        clock: Callable[[], float] = time.time,
        usage: Callable[[LmRecord], Live] = live,
    ) -> None:
        self.config = config
        self.space = space
        self.clock = clock
        self.usage = usage

    def __call__(self) -> bytes:
        config = self.config()
        store: Store | None = None
        try:  # a connection per page (a millisecond): whichever thread serves it may use it
            store = Store(config.factory.state_dir, readonly=True)
            now = self.clock()
            active = store.active()
            last = store.last_finished(config.machinetypes)
            timeline = store.timeline(now - DAY)
            ended = store.last_ended(RECENT)
            draining = store.meta("draining") == "1"
        except StoreError as err:
            return _document(
                "lmrunner", f"<p class=bad>The state store cannot be read: {_e(str(err))}</p>"
            ).encode()
        finally:
            if store is not None:
                store.close()
        body = [
            _summary(config, active, now, draining, self.space()),
            _machinetypes(config, active, last, self.space(), now),
            _running(active, now, self.usage),
            _plots(
                timeline, now, config.factory.total_processors, sum(r.processors for r in active)
            ),
            _ended(ended, now),
        ]
        title = f"lmrunner {config.factory.hostname}"
        return _document(title, "\n".join(body)).encode()


# --- sections --------------------------------------------------------------------------------


def _summary(
    config: Config, active: list[LmRecord], now: float, draining: bool, space: SpaceView | None
) -> str:
    factory = config.factory
    used = sum(r.processors for r in active)
    rows = [
        ("space", factory.space),
        ("processors", f"{used} of {factory.total_processors} in use by {len(active)} LMs"),
        ("starting new LMs", "no: draining" if draining or factory.draining else "yes"),
        ("lmrunner", __version__),
        ("page made", _when(now)),
    ]
    if space is not None:
        rows.append(
            (
                "other factories",
                f"{len(space.answered)} answered, "
                f"{len(space.silent)} silent ({_ago(now - space.taken)} ago)",
            )
        )
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<h1>{_e(factory.hostname)}</h1>\n<table class=kv>{cells}</table>"


def _machinetypes(
    config: Config,
    active: list[LmRecord],
    last: dict[str, LmRecord],
    space: SpaceView | None,
    now: float,
) -> str:
    histories = planning.histories_from(config, last, space)
    rows = []
    for name, mt in config.machinetypes.items():
        mine = [r for r in active if r.machinetype == name]
        history = histories.get(name)
        abort = None if history is None else history.last_abort
        backoff = "-"
        if abort is not None and now < abort + mt.backoff_seconds:
            backoff = f"until {_when(abort + mt.backoff_seconds)}"
        record = last.get(name)
        outcome = "-"
        if record is not None and record.outcome is not None:
            outcome = f"{record.outcome.message} ({_ago(now - (record.finished or now))} ago)"
        rows.append(
            (
                name,
                mt.backend.value,
                f"{mt.target_share:g}",
                str(len(mine)),
                str(sum(r.processors for r in mine)),
                backoff,
                outcome,
            )
        )
    return _table(
        "Machinetypes",
        ("machinetype", "backend", "share", "LMs", "processors", "backoff", "last outcome"),
        rows,
    )


def _running(active: list[LmRecord], now: float, usage: Callable[[LmRecord], Live]) -> str:
    rows = []
    for record in sorted(active, key=lambda r: r.slot):
        use = usage(record)
        uptime = "-" if record.started is None else _ago(now - record.started)
        cpu = "-"
        if use.cpu_seconds is not None and record.started is not None and now > record.started:
            cpu = f"{100 * use.cpu_seconds / ((now - record.started) * record.processors):.0f}%"
        rows.append(
            (
                record.name,
                record.machinetype,
                record.backend,
                record.state.value,
                str(record.processors),
                uptime,
                cpu,
                _bytes(use.memory_bytes),
                _bytes(use.disk_bytes),
            )
        )
    return _table(
        "Running LMs",
        (
            "name",
            "machinetype",
            "backend",
            "state",
            "processors",
            "uptime",
            "CPU",
            "memory",
            "disk",
        ),
        rows,
    )


def _ended(rows: Sequence[sqlite3.Row], now: float) -> str:
    out = []
    for row in rows:
        outcome = json.loads(row["outcome"]) if row["outcome"] else None
        text = "-" if outcome is None else f"{outcome.get('code')} {outcome.get('text')}"
        ran = "-"
        if row["started"] is not None and row["finished"] is not None:
            ran = _ago(row["finished"] - row["started"])
        out.append(
            (
                row["name"],
                row["machinetype"],
                row["backend"],
                f"{_ago(now - row['finished'])} ago",
                ran,
                text,
            )
        )
    return _table("Recent ends", ("name", "machinetype", "backend", "ended", "ran", "outcome"), out)


# --- the day's plots ---------------------------------------------------------------------------


def day_series(
    timeline: Sequence[sqlite3.Row | dict[str, object]], now: float, bins: int = BINS
) -> tuple[list[int], list[list[int]], list[float]]:
    """Per hour of the last day: starts, ends per outcome class, and the processors in use
    (averaged over the hour)."""
    start = now - DAY
    width = DAY / bins
    starts = [0] * bins
    ends = [[0] * bins for _ in CLASSES]
    busy = [0.0] * bins
    for row in timeline:
        processors = float(row["processors"])  # type: ignore[arg-type]
        began = row["started"]
        finished = row["finished"]
        if isinstance(began, int | float) and began >= start:
            starts[min(int((began - start) / width), bins - 1)] += 1
        if isinstance(finished, int | float) and finished >= start:
            code = row["code"]
            cls = len(CLASSES) - 1
            for index, (_label, low, high) in enumerate(CLASSES[:-1]):
                if isinstance(code, int) and low <= code < high:
                    cls = index
            ends[cls][min(int((finished - start) / width), bins - 1)] += 1
        if isinstance(began, int | float):
            end = finished if isinstance(finished, int | float) else now
            for index in range(bins):
                left, right = start + index * width, start + (index + 1) * width
                overlap = min(end, right) - max(began, left)
                if overlap > 0:
                    busy[index] += processors * overlap / width
    return starts, ends, busy


def _plots(timeline: Sequence[sqlite3.Row], now: float, total: int, used: int) -> str:
    starts, ends, busy = day_series(timeline, now)
    hours = [_hour(now - DAY + (i + 1) * DAY / BINS) for i in range(BINS)]
    parts = ["<h2>The last day</h2>", "<div class=plots>"]
    parts.append(
        _figure("LMs started per hour", _bars([starts], ("#1565c0",)), hours, [("started", starts)])
    )
    labels = [label for label, _low, _high in CLASSES]
    parts.append(
        _figure(
            "LMs ended per hour, by outcome",
            _bars(ends, COLOURS, labels),
            hours,
            list(zip(labels, ends, strict=True)),
        )
    )
    rounded = [round(value, 1) for value in busy]
    parts.append(
        _figure(
            f"Processors in use, hourly mean (of {total}; {used} now)",
            _line(busy, max(total, 1)),
            hours,
            [("processors", rounded)],
        )
    )
    parts.append("</div>")
    return "\n".join(parts)


W, H, PAD = 360, 120, 18


def _bars(
    series: Sequence[Sequence[int]], colours: Sequence[str], labels: Sequence[str] = ()
) -> str:
    """Stacked bars, one per hour."""
    top = max([sum(column) for column in zip(*series, strict=True)] + [1])
    step = (W - PAD) / BINS
    out = []
    for index in range(BINS):
        y = float(H - PAD)
        for values, colour in zip(series, colours, strict=False):
            height = (H - 2 * PAD) * values[index] / top
            if height > 0:
                y -= height
                out.append(
                    f'<rect x="{PAD + index * step + 1:.1f}" y="{y:.1f}" '
                    f'width="{step - 2:.1f}" height="{height:.1f}" fill="{colour}"/>'
                )
    legend = "".join(
        f'<rect x="{PAD + i * 90}" y="2" width="8" height="8" fill="{c}"/>'
        f'<text x="{PAD + i * 90 + 11}" y="10">{_e(label)}</text>'
        for i, (label, c) in enumerate(zip(labels, colours, strict=False))
    )
    return _svg("".join(out) + legend, top)


def _line(values: Sequence[float], top: float) -> str:
    step = (W - PAD) / BINS
    points = " ".join(
        f"{PAD + (i + 0.5) * step:.1f},{H - PAD - (H - 2 * PAD) * min(v / top, 1.0):.1f}"
        for i, v in enumerate(values)
    )
    return _svg(f'<polyline points="{points}" fill="none" stroke="#1565c0" stroke-width="2"/>', top)


def _svg(content: str, top: float) -> str:
    axis = (
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W}" y2="{H - PAD}" stroke="#999"/>'
        f'<text x="0" y="{PAD + 4}">{top:g}</text><text x="0" y="{H - PAD}">0</text>'
        f'<text x="{PAD}" y="{H - 4}">-24 h</text><text x="{W - 30}" y="{H - 4}">now</text>'
    )
    return (
        f'<svg viewBox="0 0 {W} {H}" role="img" xmlns="http://www.w3.org/2000/svg" '
        f'font-size="9" font-family="sans-serif">{axis}{content}</svg>'
    )


def _figure(
    title: str, svg: str, hours: Sequence[str], series: Sequence[tuple[str, Sequence[float | int]]]
) -> str:
    """A plot with its numbers in a table (terminal browsers and screen readers read that)."""
    head = "".join(f"<th>{_e(h)}</th>" for h in hours)
    body = "".join(
        f"<tr><th>{_e(name)}</th>" + "".join(f"<td>{v:g}</td>" for v in values) + "</tr>"
        for name, values in series
    )
    return (
        f"<figure><figcaption>{_e(title)}</figcaption>{svg}<details><summary>numbers"
        f"</summary><div class=scroll><table><tr><th>hour ending</th>{head}</tr>{body}"
        f"</table></div></details></figure>"
    )


# --- HTML ----------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;padding:0 .6em 2em;max-width:72em;
color:#222;background:#fff}
h1{font-size:1.4em;margin:.6em 0 .3em}h2{font-size:1.1em;margin:1.2em 0 .3em}
table{border-collapse:collapse;font-size:.9em}th,td{padding:.15em .5em;text-align:left;
border-bottom:1px solid #ddd;white-space:nowrap}table.kv th{color:#555;font-weight:normal}
.scroll{overflow-x:auto}.plots{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;flex:1 1 20em;max-width:36em}figcaption{font-weight:bold;font-size:.9em}
svg{width:100%;height:auto}.bad{color:#c62828}.none{color:#777}
"""


def _document(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f'<meta http-equiv=refresh content="{REFRESH_SECONDS}">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n"
        "</body></html>\n"
    )


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    if not rows:
        return f"<h2>{_e(title)}</h2><p class=none>none</p>"
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<h2>{_e(title)}</h2><div class=scroll><table><tr>{head}</tr>{body}</table></div>"


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _when(moment: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(moment))


def _hour(moment: float) -> str:
    return time.strftime("%H:%M", time.gmtime(moment))


def _ago(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 2 * 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value = value / 1024  # type: ignore[assignment]
    return "-"
