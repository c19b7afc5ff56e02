"""contrib/: the Prometheus rules pass ``promtool`` (check and their unit tests), and the rules
and the Grafana dashboard use only metric names that lmrunner serves."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lmrunner.config import BackendName, Config, FactoryConfig, MachinetypeConfig
from lmrunner.lifecycle import Outcome, OutcomeSource
from lmrunner.metrics import Metrics, Sources
from lmrunner.model import Limits
from lmrunner.state import LmRecord, Store
from lmrunner.vacquery.space import SpaceView

pytestmark = [pytest.mark.prometheus]

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "contrib" / "prometheus"
RULES = PROMETHEUS / "lmrunner-rules.yml"
RULE_TESTS = PROMETHEUS / "lmrunner-rules.test.yml"
DASHBOARD = REPO / "contrib" / "grafana" / "lmrunner-dashboard.json"

#: Series Prometheus makes itself, not lmrunner.
PROMETHEUS_OWN = frozenset({"up"})
#: A PromQL string literal (label values may contain anything).
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
#: A name: metric, label, function or keyword (not part of a number, a $variable or a duration).
_NAME = re.compile(r"(?<![\w:$.])[A-Za-z_][\w:]*")
#: Grafana's variables in the dashboard's expressions, and what stands for them in promtool.
_GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$instance": ".*",
    "$machinetype": ".*",
}
GIB = 1024**3


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def promtool() -> str:
    """Debian's promtool (package prometheus)."""
    found = shutil.which("promtool")
    if found is None:
        if _in_ci():
            pytest.fail("promtool not on PATH under CI=true: install Debian's prometheus")
        pytest.skip("promtool not on PATH: apt-get install prometheus")
    return found


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [target["expr"] for panel in _panels(dashboard) for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            exprs.append(query if isinstance(query, str) else query["query"])
    return exprs


def _names(expr: str) -> set[str]:
    """Metric names (lmrunner's and recorded ones) that an expression reads."""
    bare = _STRING.sub('""', expr)
    return {
        name
        for name in _NAME.findall(bare)
        if name.startswith("lmrunner_") or ":" in name or name in PROMETHEUS_OWN
    }


def _record(**changes: Any) -> LmRecord:
    values: dict[str, Any] = {
        "uuid": "4f1c0e6a-0000-4000-8000-000000000001",
        "name": "lm-00",
        "machinetype": "alpha",
        "backend": "fake",
        "slot": 0,
        "processors": 1,
        "limits": Limits(
            processors=1, memory_bytes=2 * GIB, swap_bytes=0, disk_bytes=40 * GIB, hs06=10.0
        ),
        "hs06": 10.0,
        "shutdown_time": 1_700_086_400,
        "directory": Path("/var/lib/lmrunner/machines/lm-00"),
        "created": 1_700_000_000.0,
    }
    values.update(changes)
    return LmRecord(**values)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> frozenset[str]:
    """Every sample name lmrunner's registry serves, with every optional source present."""
    state_dir = tmp_path_factory.mktemp("contrib") / "state"
    Store(state_dir).close()  # a readable store: lmrunner_store_up 1 and the backoff gauges
    config = Config(
        factory=FactoryConfig(space="space.example.com", state_dir=state_dir, total_processors=4),
        machinetypes={
            "alpha": MachinetypeConfig(name="alpha", backend=BackendName.FAKE, image="x")
        },
        pipes={},
        files=(),
    )
    space = SpaceView(
        taken=time.time(), answered=("b.example.com",), silent=("c.example.com",), seconds=0.5
    )
    metrics = Metrics(
        Sources(
            config=lambda: config,
            backends=lambda: ["fake"],
            space=lambda: space,
            pipes=lambda: {"pipe": (30.0, 1)},
            images=lambda: {"alpha": ("ready", 60.0)},
        )
    )
    metrics.started(_record())
    metrics.ended(
        _record(outcome=Outcome(200, "Intended work completed ok", OutcomeSource.PAYLOAD))
    )
    metrics.ended(_record(outcome=Outcome(500, "Killed by OOM", OutcomeSource.OOM), cpu_seconds=5))
    metrics.passed(0.01, None)
    metrics.reacted(0.1)
    text = generate_latest(metrics.registry).decode()
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:  # gauges: also those with no sample here (live cgroup usage)
            names.add(family.name)
    return frozenset(names)


def test_promtool_check_rules(promtool: str) -> None:
    result = _run([promtool, "check", "rules", str(RULES)], cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests(promtool: str) -> None:
    result = _run([promtool, "test", "rules", RULE_TESTS.name], cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_has_for_severity_annotations_and_both_kinds_of_test_case() -> None:
    alerts = [rule for rule in _rules() if "alert" in rule]
    names = {rule["alert"] for rule in alerts}
    assert {
        "LmrunnerFactoryNotPassing",
        "LmrunnerEngineDown",
        "LmrunnerMachinetypeBackingOffForHours",
        "LmrunnerOomKills",
        "LmrunnerHeartbeatKills",
        "LmrunnerStateDirNearlyFull",
        "LmrunnerStoreUnreadable",
        "LmrunnerNotStartingLMs",
        "LmrunnerSpaceFactoriesSilent",
    } <= names
    for rule in alerts:
        assert "for" in rule, rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
    cases = [
        case
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested with nothing firing"


def test_rules_and_dashboard_use_only_served_metric_names(served: frozenset[str]) -> None:
    rules = _rules()
    recorded = {rule["record"] for rule in rules if "record" in rule}
    for name in recorded:  # level:metric:operations, of a served metric
        assert re.fullmatch(r"[a-z_]+:lmrunner_[a-z_]+:[a-z0-9_]+", name), name
    sources = {f"rule {rule.get('record') or rule['alert']}": rule["expr"] for rule in rules}
    for number, expr in enumerate(_dashboard_exprs(_dashboard())):
        sources[f"dashboard expression {number}: {expr}"] = expr
    used: set[str] = set()
    for where, expr in sources.items():
        names = _names(expr)
        assert names, f"{where} reads no metric"
        unknown = names - served - recorded - PROMETHEUS_OWN
        assert not unknown, f"{where} reads {sorted(unknown)}, which lmrunner does not serve"
        used |= names
    # The scan does see lmrunner's names (a broken pattern would pass everything above).
    assert {"lmrunner_lm_ends_total", "lmrunner_pass_duration_seconds_bucket"} <= used
    assert {"lmrunner_pipe_age_seconds", "lmrunner_space_factories"} <= served


def test_dashboard_loads_with_unique_panel_ids_and_an_expr_per_target() -> None:
    dashboard = _dashboard()
    assert dashboard["title"]
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["instance"]["query"] == "label_values(lmrunner_build_info, instance)"
    assert "machinetype" in variables
    panels = list(_panels(dashboard))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {ids}"
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        for target in panel["targets"]:
            assert target.get("expr"), f"{panel['title']}: target {target.get('refId')}"


def test_dashboard_expressions_parse(promtool: str, tmp_path: Path) -> None:
    """Each expression, its Grafana variables replaced, is valid PromQL (promtool parses it)."""
    rules = []
    for panel in _panels(_dashboard()):
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in _GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            rules.append(
                {"record": f"dashboard_panel_{panel['id']}_{target['refId']}", "expr": expr}
            )
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([promtool, "check", "rules", str(path)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
