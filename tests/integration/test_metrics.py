"""A real Prometheus scrapes a real ``lmrunner daemon`` running real Docker LMs.

Proven here, end to end (lmrunner's ``/metrics`` -> Prometheus' scraper and TSDB -> PromQL):

- Prometheus (Debian's ``/usr/bin/prometheus``, run by the test on a loopback port with its own
  configuration and storage, never the Debian service) can scrape the daemon's
  ``factory.metrics_listen`` endpoint: ``up{job="lmrunner"} == 1``.
- ``sum(lmrunner_lms{state="running"})`` agrees with the running LMs ``lmrunner ps --json``
  shows (compared until both agree and stay so for a few seconds: scrapes lag).
- An LM whose payload writes ``300 No more work`` is counted once in
  ``lmrunner_lm_ends_total{code="300",machinetype="nowork",source="payload"}``, and the count
  stays 1 across later scrapes (its machinetype backs off for an hour: it runs exactly once).
- ``lmrunner_lm_starts_total`` counts at least the LMs ``ps`` shows (plus the one that ended);
  ``lmrunner_processors_used`` is the processors those LMs hold; the ended type shows 0
  running; ``lmrunner_last_pass_timestamp_seconds`` is recent; ``lmrunner_build_info`` is
  exported; ``lmrunner_processors_total`` is the configured 2.
- Asked for OpenMetrics (``Accept: application/openmetrics-text; version=1.0.0``), the daemon's
  ``/metrics`` answers with the OpenMetrics content type and a body ending in ``# EOF``.

Under ``CI=true`` a missing Prometheus binary fails the test; elsewhere it skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.integration.conftest import REPO, TIMESCALE, remove_lms

pytestmark = [pytest.mark.prometheus, pytest.mark.docker, pytest.mark.slow]

PROMETHEUS = Path("/usr/bin/prometheus")
HOSTNAME = "metricstest.example.com"
LONG_SCRIPT = "#!/bin/sh\nsleep 3600\n"
#: Ends by itself after about 2 s with a "no more work" abort (code 300).
NOWORK_SCRIPT = (
    "#!/bin/sh\nsleep 2\necho '300 No more work' > $JOBOUTPUTS/shutdown_message\nexit 0\n"
)
ENDS_300 = 'lmrunner_lm_ends_total{code="300",machinetype="nowork"}'


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(what: str, condition: Callable[[], bool], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout * TIMESCALE
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"not within {timeout} s: {what}\n{_tail(log)}")


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path}: no log)"


def stop_process(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL when it has not exited within ``timeout`` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def write_config(top: Path, metrics_port: int) -> Path:
    long_data, nowork_data = top / "long.user_data", top / "nowork.user_data"
    long_data.write_text(LONG_SCRIPT)
    nowork_data.write_text(NOWORK_SCRIPT)
    common = {
        "backend": "docker",
        "image": "docker://vcbusybox:latest",
        "target_share": 1,
        "fizzle_seconds": 0,
        "stop_grace_seconds": 2,
    }
    document = {
        "factory": {
            "space": "metrics.example.com",
            "hostname": HOSTNAME,
            "state_dir": str(top / "state"),
            "total_processors": 2,  # this host has 2 CPUs
            "overload_per_processor": 1000,
            "vacquery_port": 0,
            "disk_gb_per_processor": 0.05,
            "metrics_listen": f"127.0.0.1:{metrics_port}",
        },
        "machinetypes": {
            "long": {**common, "user_data": str(long_data), "backoff_seconds": 10},
            "nowork": {**common, "user_data": str(nowork_data), "backoff_seconds": 3600},
        },
    }
    path = top / "lmrunner.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@dataclass
class Setup:
    config: Path
    log: Path
    metrics_url: str
    prometheus_url: str
    prometheus_log: Path

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        answer = requests.get(
            f"{self.prometheus_url}/api/v1/query", params={"query": promql}, timeout=10
        )
        answer.raise_for_status()
        body: dict[str, Any] = answer.json()
        assert body["status"] == "success", body
        assert body["data"]["resultType"] == "vector", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, promql: str) -> float | None:
        """The single sample of a query, None when the result is empty."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, f"{promql}: more than one series: {result}"
        return float(result[0]["value"][1])

    def ps(self) -> list[dict[str, Any]]:
        """``lmrunner ps --json``: the active LMs."""
        done = subprocess.run(
            [sys.executable, "-m", "lmrunner", "ps", "--json", "--config", str(self.config)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=60,
            check=True,
        )
        document: dict[str, Any] = json.loads(done.stdout)
        assert document["schema"] == "lmrunner.ps/1", document
        lms: list[dict[str, Any]] = document["lms"]
        return lms

    def ps_all(self) -> list[dict[str, Any]]:
        done = subprocess.run(
            [sys.executable, "-m", "lmrunner", "ps", "--all", "--json", "--config",
             str(self.config)],
            capture_output=True, text=True, cwd=REPO, timeout=60, check=True,
        )  # fmt: skip
        lms: list[dict[str, Any]] = json.loads(done.stdout)["lms"]
        return lms


def prometheus_binary() -> Path:
    if not os.access(PROMETHEUS, os.X_OK):
        message = f"{PROMETHEUS} missing: install Debian's prometheus (scripts/bootstrap)"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return PROMETHEUS


@pytest.fixture
def setup(tmp_path: Path, docker_client: Any, vcbusybox: Path) -> Iterator[Setup]:
    """A daemon (Docker LMs, /metrics on a free port) and a Prometheus scraping it every
    second; both stopped (SIGTERM, then SIGKILL) and the LMs removed at the end."""
    binary = prometheus_binary()
    metrics_port, prometheus_port = free_tcp_port(), free_tcp_port()
    config = write_config(tmp_path, metrics_port)
    log = tmp_path / "daemon.log"
    prometheus_log = tmp_path / "prometheus.log"
    prometheus_config = tmp_path / "prometheus.yml"
    prometheus_config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                           "evaluation_interval": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "lmrunner",
                        "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                    }
                ],
            }
        )
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        stack.callback(remove_lms, config)  # last: LMs outlive their daemon by design
        with log.open("ab") as err:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "lmrunner", "daemon", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=REPO,
            )
        stack.callback(stop_process, daemon)
        with prometheus_log.open("ab") as err:
            prometheus = subprocess.Popen(
                [
                    str(binary),
                    f"--config.file={prometheus_config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prometheus_port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=tmp_path,
            )
        stack.callback(stop_process, prometheus)
        result = Setup(
            config,
            log,
            f"http://127.0.0.1:{metrics_port}/metrics",
            f"http://127.0.0.1:{prometheus_port}",
            prometheus_log,
        )

        def ready(url: str, process: subprocess.Popen[bytes], what: Path) -> Callable[[], bool]:
            def check() -> bool:
                assert process.poll() is None, f"exited ({process.returncode}):\n{_tail(what)}"
                try:
                    return requests.get(url, timeout=2).status_code == 200
                except requests.RequestException:
                    return False

            return check

        wait_until("the daemon serves /metrics", ready(result.metrics_url, daemon, log), 30, log)
        wait_until(
            "Prometheus is ready",
            ready(f"{result.prometheus_url}/-/ready", prometheus, prometheus_log),
            60,
            prometheus_log,
        )
        yield result
        # After a body without error: neither left a traceback or a panic.
        stop_process(prometheus)
        stop_process(daemon)
        assert "Traceback" not in log.read_text(errors="replace"), _tail(log)
        assert "panic" not in prometheus_log.read_text(errors="replace"), _tail(prometheus_log)


def test_prometheus_scrapes_the_daemon_and_its_numbers_match_ps(setup: Setup) -> None:
    started = time.monotonic()
    wait_until("Prometheus scraped the daemon", lambda: setup.value('up{job="lmrunner"}') == 1.0,
               30, setup.prometheus_log)  # fmt: skip

    # The nowork LM ran once and ended with its 300 (in the store, as ps --all shows it).
    def nowork_ended() -> bool:
        ended = [lm for lm in setup.ps_all() if lm["machinetype"] == "nowork" and lm["finished"]]
        return bool(ended)

    wait_until("the nowork LM ended", nowork_ended, 60, setup.log)
    nowork = [lm for lm in setup.ps_all() if lm["machinetype"] == "nowork"]
    assert len(nowork) == 1, nowork  # backoff_seconds 3600: it ran exactly once
    assert nowork[0]["outcome"]["code"] == 300, nowork[0]
    assert nowork[0]["outcome"]["source"] == "payload", nowork[0]

    wait_until("Prometheus has the 300 end", lambda: setup.value(ENDS_300) is not None, 15,
               setup.prometheus_log)  # fmt: skip
    assert setup.value(ENDS_300) == 1.0, setup.query(ENDS_300)
    assert setup.query(ENDS_300)[0]["metric"]["source"] == "payload"
    counted_at = time.time()

    # The running LMs Prometheus saw agree with ps, and stay agreeing for a few seconds.
    agreed: list[tuple[int, float | None]] = []

    def stable_agreement() -> bool:
        running = sum(1 for lm in setup.ps() if lm["state"] == "running")
        seen = setup.value('sum(lmrunner_lms{state="running"})')
        agreed.append((running, seen))
        recent = agreed[-6:]  # 3 s of agreement (0.5 s apart)
        return len(recent) == 6 and all(r == s for r, s in recent) and len(set(recent)) == 1

    wait_until(f"ps and Prometheus agree on the running LMs: {agreed[-10:]}", stable_agreement,
               30, setup.log)  # fmt: skip
    running = agreed[-1][0]
    assert running >= 1, agreed  # the long LM(s)
    print(f"running LMs: {running} (ps and Prometheus agree); history {agreed}")

    # Counted once, and still 1 across the later scrapes: every sample since is exactly 1.
    time.sleep(3)
    end = time.time()
    params: dict[str, str | float] = {"query": ENDS_300, "start": counted_at, "end": end,
                                      "step": "1s"}  # fmt: skip
    answer = requests.get(
        f"{setup.prometheus_url}/api/v1/query_range", params=params, timeout=10
    ).json()
    assert answer["status"] == "success", answer
    series = answer["data"]["result"]
    assert len(series) == 1, series
    samples = [float(value) for _t, value in series[0]["values"]]
    assert len(samples) >= 3 and set(samples) == {1.0}, samples
    assert setup.value(f"max_over_time({ENDS_300}[5m])") == 1.0
    assert setup.value('sum(lmrunner_lm_ends_total{machinetype="nowork"})') == 1.0

    # Starts: at least every LM ps shows, plus the ended nowork one.
    starts = setup.value("sum(lmrunner_lm_starts_total)")
    assert starts is not None and starts >= len(setup.ps()) + 1, (starts, setup.ps())
    assert setup.value('sum(lmrunner_lm_starts_total{machinetype="nowork"})') == 1.0

    # The state gauges: processors held, the ended type shows 0 running, a recent pass.
    held = sum(lm["processors"] for lm in setup.ps())
    assert setup.value("lmrunner_processors_used") == float(held), held
    assert setup.value('lmrunner_lms{machinetype="nowork",state="running"}') == 0.0
    age = setup.value("time() - lmrunner_last_pass_timestamp_seconds")
    assert age is not None and age < 30, age

    build = setup.query("lmrunner_build_info")
    assert len(build) == 1 and float(build[0]["value"][1]) == 1.0, build
    assert build[0]["metric"]["version"] and build[0]["metric"]["python"], build
    assert setup.value("lmrunner_processors_total") == 2.0

    # The daemon's endpoint itself speaks OpenMetrics when asked.
    answer_om = requests.get(
        setup.metrics_url,
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        timeout=10,
    )
    assert answer_om.status_code == 200
    content_type = answer_om.headers["Content-Type"]
    assert content_type.startswith("application/openmetrics-text"), content_type
    assert "version=1.0.0" in content_type, content_type
    assert answer_om.text.endswith("# EOF\n"), answer_om.text[-200:]
    assert "lmrunner_lm_starts_total{" in answer_om.text
    print(f"scenario took {time.monotonic() - started:.1f} s")
