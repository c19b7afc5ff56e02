"""Live Vacuum Pipes (lmrunner.pipewatch): rounds on a fake clock, then the thread for real,
all against a local HTTP server (tests.unit.test_pipes.PipeServer)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from lmrunner import pipewatch
from lmrunner.config import PipeConfig
from lmrunner.pipes import CachedPipe, PipeStore, RefreshResult
from lmrunner.pipewatch import MIN_WAIT_SECONDS, RETRY_SECONDS, PipeWatch
from tests.unit.test_pipes import PipeServer

T0 = 1_700_000_000.0
PROD: dict[str, Any] = {"suffix": "prod", "machine_model": "docker",
                        "root_image": "docker://registry.example.com/vo/prod:1",
                        "target_share": 1}  # fmt: skip
DOC: dict[str, Any] = {"cache_seconds": 600, "machinetypes": [PROD]}


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Changed:
    """``changed``: counts its calls, and sets an event for the thread tests."""

    def __init__(self) -> None:
        self.calls = 0
        self.event = threading.Event()
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.calls += 1
        self.event.set()

    def wait(self, timeout: float) -> bool:
        """Whether a call came within ``timeout`` (and forget it: the next wait waits anew)."""
        came = self.event.wait(timeout)
        self.event.clear()
        return came


class Pipes:
    """``pipes``: a mapping the test may change between rounds (a reload)."""

    def __init__(self, **pipes: PipeConfig) -> None:
        self.pipes = dict(pipes)

    def __call__(self) -> Mapping[str, PipeConfig]:
        return dict(self.pipes)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[PipeServer]:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                 "ALL_PROXY"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    made = PipeServer()
    made.serve(DOC)
    yield made
    made.stop()


def pipe(server: PipeServer, name: str = "vo", path: str = "/vo.json") -> PipeConfig:
    return PipeConfig(name=name, url=server.url(path), target_share=1.0, allow_http=True,
                      timeout_seconds=5.0)  # fmt: skip


def store_in(tmp_path: Path) -> PipeStore:
    return PipeStore(tmp_path / "state" / "pipescache")


def doc(cache_seconds: int, *entries: Mapping[str, Any]) -> dict[str, Any]:
    return {"cache_seconds": cache_seconds, "machinetypes": list(entries or [PROD])}


def entry(suffix: str) -> dict[str, Any]:
    return {**PROD, "suffix": suffix}


# --- round() on a fake clock --------------------------------------------------------------------


def test_a_new_install_fetches_at_once_and_asks_for_a_reload(
    tmp_path: Path, server: PipeServer, caplog: pytest.LogCaptureFixture
) -> None:
    store, changed = store_in(tmp_path), Changed()
    watch = PipeWatch(store, Pipes(vo=pipe(server)), changed, clock=Clock())
    with caplog.at_level(logging.INFO, logger="lmrunner.pipewatch"):
        assert watch.round() == 600
    assert server.requests == 1
    assert changed.calls == 1
    assert store.load("vo") == CachedPipe(server.url(), T0, DOC)
    assert [r.getMessage() for r in caplog.records] == [
        "pipe vo: a new document (1 entries): reloading"
    ]


def test_an_unchanged_document_fetched_again_asks_for_nothing(
    tmp_path: Path, server: PipeServer
) -> None:
    clock, changed = Clock(), Changed()
    watch = PipeWatch(store_in(tmp_path), Pipes(vo=pipe(server)), changed, clock=clock)
    watch.round()
    assert changed.calls == 1
    for step in (600, 1200, 1800):
        clock.now = T0 + step
        assert watch.round() == 600
    assert server.requests == 4  # fetched every time it was due
    assert changed.calls == 1


def test_a_changed_document_asks_for_one_reload(tmp_path: Path, server: PipeServer) -> None:
    clock, changed = Clock(), Changed()
    store = store_in(tmp_path)
    watch = PipeWatch(store, Pipes(vo=pipe(server)), changed, clock=clock)
    watch.round()
    newer = doc(600, PROD, entry("test"))
    server.serve(newer)
    clock.now = T0 + 300  # not due yet: the change is not seen
    assert watch.round() == 300
    assert (server.requests, changed.calls) == (1, 1)
    clock.now = T0 + 600
    watch.round()
    assert (server.requests, changed.calls) == (2, 2)
    loaded = store.load("vo")
    assert loaded is not None and loaded.document == newer
    for step in (700, 1200, 1800):  # fresh, then fetched again unchanged: no more reloads
        clock.now = T0 + step
        watch.round()
    assert (server.requests, changed.calls) == (4, 2)


def test_a_daemon_start_with_a_cached_copy_fetches_when_due_and_finds_no_news(
    tmp_path: Path, server: PipeServer
) -> None:
    store = store_in(tmp_path)
    assert store.refresh(pipe(server), at=T0).status == "fetched"  # an earlier run's copy
    clock, changed = Clock(T0 + 100), Changed()
    watch = PipeWatch(store, Pipes(vo=pipe(server)), changed, clock=clock)
    assert watch.round() == 500  # the copy is fresh: nothing fetched
    clock.now = T0 + 600
    assert watch.round() == 600
    assert (server.requests, changed.calls) == (2, 0)


def test_round_returns_the_time_until_the_earliest_due_pipe(
    tmp_path: Path, server: PipeServer
) -> None:
    server.serve(doc(600))
    clock, changed = Clock(), Changed()
    pipes = Pipes(slow=pipe(server, "slow", "/slow.json"))
    watch = PipeWatch(store_in(tmp_path), pipes, changed, clock=clock)
    assert watch.round() == 600
    server.serve(doc(120))  # cache_seconds comes from the document
    pipes.pipes["fast"] = pipe(server, "fast", "/fast.json")
    clock.now = T0 + 10
    assert watch.round() == 120  # fast fetched at T0+10, due at T0+130; slow due at T0+600
    clock.now = T0 + 100
    assert watch.round() == 30
    clock.now = T0 + 130
    assert watch.round() == 120  # fast fetched again: due at T0+250
    clock.now = T0 + 590
    assert watch.round() == 10  # slow, due at T0+600, comes first (fast: fetched now)
    assert changed.calls == 2  # each pipe's first copy


def test_round_waits_at_least_min_wait_seconds(tmp_path: Path, server: PipeServer) -> None:
    server.serve(doc(1))
    watch = PipeWatch(store_in(tmp_path), Pipes(vo=pipe(server)), Changed(), clock=Clock())
    assert watch.round() == MIN_WAIT_SECONDS  # due in 1 s: never less than the floor
    ticking = iter([T0 + 1, T0 + 1.9])  # the fetch took 0.9 s: 0.1 s left, the floor wins
    watch.clock = lambda: next(ticking)
    assert watch.round() == MIN_WAIT_SECONDS


def test_no_pipes_sleep_long(tmp_path: Path) -> None:
    watch = PipeWatch(store_in(tmp_path), Pipes(), Changed(), clock=Clock())
    assert watch.round() == RETRY_SECONDS * 60


@pytest.mark.parametrize("cache_seconds", [600, 30], ids=["long-cache", "short-cache"])
def test_a_failed_fetch_keeps_the_last_good_copy_and_retries_soon(
    tmp_path: Path, server: PipeServer, cache_seconds: int
) -> None:
    good = doc(cache_seconds)
    server.serve(good)
    clock, changed = Clock(), Changed()
    store = store_in(tmp_path)
    watch = PipeWatch(store, Pipes(vo=pipe(server)), changed, clock=clock)
    watch.round()
    assert changed.calls == 1
    server.serve("oops", status=500)
    clock.now = T0 + cache_seconds
    assert watch.round() == min(RETRY_SECONDS, cache_seconds)
    assert server.requests == 2
    assert changed.calls == 1  # nothing changed for the daemon
    assert store.load("vo") == CachedPipe(server.url(), T0, good)  # still the good copy
    assert store.documents({"vo": pipe(server)}) == {"vo": good}
    # Back again, with the same document: fetched, but no reload.
    server.serve(good)
    clock.now += min(RETRY_SECONDS, cache_seconds)
    assert watch.round() == cache_seconds
    assert (server.requests, changed.calls) == (3, 1)


def test_a_failed_first_fetch_is_tried_again_after_retry_seconds(
    tmp_path: Path, server: PipeServer
) -> None:
    server.serve("not json", status=200)
    clock, changed = Clock(), Changed()
    store = store_in(tmp_path)
    watch = PipeWatch(store, Pipes(vo=pipe(server)), changed, clock=clock)
    assert watch.round() == RETRY_SECONDS
    assert changed.calls == 0
    assert store.load("vo") is None
    server.serve(DOC)
    clock.now = T0 + RETRY_SECONDS
    assert watch.round() == 600
    assert changed.calls == 1


def test_a_pipe_whose_url_changed_is_fetched_again(tmp_path: Path, server: PipeServer) -> None:
    clock, changed = Clock(), Changed()
    pipes = Pipes(vo=pipe(server))
    store = store_in(tmp_path)
    watch = PipeWatch(store, pipes, changed, clock=clock)
    watch.round()
    moved = doc(600, entry("moved"))
    server.serve(moved)
    pipes.pipes["vo"] = pipe(server, path="/v2.json")  # a reload changed the URL
    clock.now = T0 + 10  # the old copy is fresh, but describes another URL
    assert watch.round() == 600
    assert server.paths == ["/vo.json", "/v2.json"]
    assert changed.calls == 2
    assert store.load("vo") == CachedPipe(server.url("/v2.json"), T0 + 10, moved)


def test_a_new_url_serving_the_same_document_still_asks_for_a_reload(
    tmp_path: Path, server: PipeServer
) -> None:
    """A reload that changes a pipe's URL loads the pipe without its copy (the cached one is of
    the old URL: PipeStore.documents leaves it out), so its machinetypes are gone until the
    daemon reloads once more. The first copy of the new URL must ask for that reload even when
    the document is the same as the old URL's."""
    clock, changed = Clock(), Changed()
    pipes = Pipes(vo=pipe(server))
    store = store_in(tmp_path)
    watch = PipeWatch(store, pipes, changed, clock=clock)
    watch.round()
    assert changed.calls == 1
    pipes.pipes["vo"] = pipe(server, path="/mirror.json")  # the same DOC is served there
    assert store.documents(pipes()) == {}  # what the reloaded configuration was loaded with
    clock.now = T0 + 10
    watch.round()
    assert server.paths == ["/vo.json", "/mirror.json"]
    assert store.documents(pipes()) == {"vo": DOC}
    assert changed.calls == 2, "the reloaded configuration lacks the pipe's machinetypes"


def test_a_pipe_that_is_no_longer_configured_is_not_fetched(
    tmp_path: Path, server: PipeServer
) -> None:
    clock, changed = Clock(), Changed()
    pipes = Pipes(vo=pipe(server))
    watch = PipeWatch(store_in(tmp_path), pipes, changed, clock=clock)
    watch.round()
    del pipes.pipes["vo"]
    clock.now = T0 + 10_000
    assert watch.round() == RETRY_SECONDS * 60
    assert server.requests == 1


# --- the thread ---------------------------------------------------------------------------------


@pytest.fixture
def watches() -> Iterator[list[PipeWatch]]:
    made: list[PipeWatch] = []
    yield made
    for watch in made:
        watch.close()


def test_the_thread_fetches_changes_and_closes_quickly(
    tmp_path: Path, server: PipeServer, watches: list[PipeWatch]
) -> None:
    server.serve(doc(1))
    changed = Changed()
    watch = PipeWatch(store_in(tmp_path), Pipes(vo=pipe(server)), changed)
    watches.append(watch)
    watch.start()
    assert changed.wait(5), "the first copy was not fetched"
    server.serve(doc(1, entry("next")))
    began = time.monotonic()
    assert changed.wait(5), "the changed document was not noticed"
    assert time.monotonic() - began < 3.0  # cache_seconds 1 (and the 1 s floor)
    assert changed.calls == 2
    began = time.monotonic()
    watch.close()
    assert time.monotonic() - began < 1.0
    assert watch._thread is not None and not watch._thread.is_alive()
    fetched = server.requests
    time.sleep(1.5)
    assert server.requests == fetched  # closed: no more rounds


def test_wake_looks_at_the_pipes_at_once(
    tmp_path: Path, server: PipeServer, watches: list[PipeWatch]
) -> None:
    changed = Changed()
    pipes = Pipes(vo=pipe(server))  # cache_seconds 600: the thread would sleep ten minutes
    watch = PipeWatch(store_in(tmp_path), pipes, changed)
    watches.append(watch)
    watch.start()
    assert changed.wait(5)
    server.serve(doc(600, entry("moved")))
    pipes.pipes["vo"] = pipe(server, path="/v2.json")
    began = time.monotonic()
    watch.wake()
    assert changed.wait(5), "wake() did not start a round"
    assert time.monotonic() - began < 2.0
    assert server.paths == ["/vo.json", "/v2.json"]


def test_close_before_start_and_twice_is_harmless(tmp_path: Path) -> None:
    watch = PipeWatch(store_in(tmp_path), Pipes(), Changed())
    watch.close()
    watch.close()


def test_an_exception_in_a_round_does_not_end_the_thread(
    tmp_path: Path,
    server: PipeServer,
    watches: list[PipeWatch],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = store_in(tmp_path)
    real = store.refresh
    raised = threading.Event()

    def refresh_once_broken(
        pipe: PipeConfig, *, force: bool = False, at: float | None = None
    ) -> RefreshResult:
        if not raised.is_set():
            raised.set()
            raise RuntimeError("a bug in the store")
        return real(pipe, force=force, at=at)

    monkeypatch.setattr(store, "refresh", refresh_once_broken)
    monkeypatch.setattr(pipewatch, "RETRY_SECONDS", 0.2)  # the wait after a failed round
    changed = Changed()
    watch = PipeWatch(store, Pipes(vo=pipe(server)), changed)
    watches.append(watch)
    with caplog.at_level(logging.ERROR, logger="lmrunner.pipewatch"):
        watch.start()
        assert raised.wait(5)
        assert changed.wait(5), "the thread ended with the exception"
    assert watch._thread is not None and watch._thread.is_alive()
    failures = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in failures] == [
        "pipes: refresh round failed; trying again in 0.2 s"
    ]
    assert failures[0].exc_info is not None
    assert json.loads(store.path("vo").read_text())["document"] == DOC


def test_a_copy_another_process_fetched_still_asks_for_a_reload(
    tmp_path: Path, server: PipeServer
) -> None:
    """``lmrunner check --refresh-pipes`` writes the daemon's pipe cache: a newer document found
    there (fresh, so not fetched by the watch) is no copy the running configuration has."""
    clock, changed = Clock(), Changed()
    store = store_in(tmp_path)
    watch = PipeWatch(store, Pipes(vo=pipe(server)), changed, clock=clock)
    watch.round()
    assert changed.calls == 1
    newer = doc(600, PROD, entry("test"))
    server.serve(newer)
    assert store_in(tmp_path).refresh(pipe(server), force=True, at=T0 + 5).status == "fetched"
    clock.now = T0 + 10
    watch.round()
    assert server.requests == 2  # the watch itself fetched nothing
    assert changed.calls == 2, "the running configuration still has the older document"
