"""Vacuum Pipes (lmrunner.pipes): fetching and caching through a real HTTP server, expansion."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from lmrunner.config import BackendName, Config
from lmrunner.errors import ConfigError
from lmrunner.loader import load_config
from lmrunner.pipes import DEFAULT_CACHE_SECONDS, CachedPipe, PipeStore

HOST = "factory01.example.com"
PIPE_URL = "https://pipes.example.com/vo.json"
T0 = 1_700_000_000.0

PROD: dict[str, Any] = {
    "suffix": "prod",
    "machine_model": "docker",
    "root_image": "docker://registry.example.com/vo/prod:1",
    "target_share": 3,
}
TEST: dict[str, Any] = {
    "suffix": "test",
    "machine_model": "singularity",
    "root_image": "/cvmfs/unpacked.cern.ch/vo/test",
    "target_share": 1,
}
DOC: dict[str, Any] = {"cache_seconds": 600, "machinetypes": [PROD, TEST]}


# --- a real HTTP server -----------------------------------------------------------------------


class PipeServer:
    """A ThreadingHTTPServer on 127.0.0.1 serving a changeable body and status; counts GETs."""

    def __init__(self) -> None:
        self.body = json.dumps(DOC).encode()
        self.status = 200
        self.requests = 0
        self.paths: list[str] = []
        self._lock = threading.Lock()
        state = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with state._lock:
                    state.requests += 1
                    state.paths.append(self.path)
                    status, body = state.status, state.body
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.running = True

    def url(self, path: str = "/vo.json") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def serve(self, body: bytes | str | Mapping[str, Any], status: int = 200) -> None:
        if isinstance(body, Mapping):
            body = json.dumps(body)
        self.body = body.encode() if isinstance(body, str) else body
        self.status = status

    def stop(self) -> None:
        if self.running:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(timeout=10)
            self.running = False


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[PipeServer]:
    for name in (
        "http_proxy",
        "https_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    pipe_server = PipeServer()
    yield pipe_server
    pipe_server.stop()


# --- configuration helpers ----------------------------------------------------------------------


def write_config(
    tmp_path: Path,
    pipe: Mapping[str, Any] | None = None,
    machinetypes: Mapping[str, Any] | None = None,
    factory: Mapping[str, Any] | None = None,
) -> Path:
    data: dict[str, Any] = {
        "factory": {
            "space": "space.example.com",
            "state_dir": str(tmp_path / "state"),
            **(factory or {}),
        },
        "vacuum_pipes": {"vo": {"url": PIPE_URL, "target_share": 10, **(pipe or {})}},
    }
    if machinetypes:
        data["machinetypes"] = dict(machinetypes)
    path = tmp_path / "lmrunner.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load(path: Path, documents: Mapping[str, Any] | None = None, **kwargs: Any) -> Config:
    return load_config(path, hostname=HOST, cpus=8, pipe_documents=documents, **kwargs)


def expand(
    tmp_path: Path,
    *entries: Any,
    pipe: Mapping[str, Any] | None = None,
    machinetypes: Mapping[str, Any] | None = None,
    document: Mapping[str, Any] | None = None,
    factory: Mapping[str, Any] | None = None,
) -> Config:
    """Load a configuration whose pipe ``vo`` has a document with ``entries``."""
    path = write_config(tmp_path, pipe, machinetypes, factory)
    doc = document if document is not None else {"machinetypes": list(entries)}
    return load(path, {"vo": doc}, check_files=False)


def http_setup(tmp_path: Path, server: PipeServer, **pipe: Any) -> tuple[Path, Config, PipeStore]:
    path = write_config(tmp_path, {"url": server.url(), "allow_http": True, **pipe})
    config = load(path)
    assert config.machinetypes == {}  # no copy yet: the pipe contributes nothing
    return path, config, PipeStore(config.factory.state_dir / "pipescache")


# --- fetching and caching -----------------------------------------------------------------------


def test_first_refresh_fetches_and_writes_the_cache(tmp_path: Path, server: PipeServer) -> None:
    path, config, store = http_setup(tmp_path, server)
    result = store.refresh(config.pipes["vo"], at=T0)
    assert (result.pipe, result.status) == ("vo", "fetched")
    assert result.detail == f"fetched {server.url()}"
    assert server.requests == 1
    assert server.paths == ["/vo.json"]
    cache = json.loads(store.path("vo").read_text())
    assert store.path("vo") == tmp_path / "state" / "pipescache" / "vo.json"
    assert cache == {"url": server.url(), "fetched_at": T0, "document": DOC}
    assert result.cached == CachedPipe(server.url(), T0, DOC)
    assert store.documents(config.pipes) == {"vo": DOC}

    loaded = load(path, store.documents(config.pipes))
    assert set(loaded.machinetypes) == {"vo-prod", "vo-test"}
    assert {mt.pipe for mt in loaded.machinetypes.values()} == {"vo"}


def test_refresh_within_cache_seconds_does_not_fetch(tmp_path: Path, server: PipeServer) -> None:
    _, config, store = http_setup(tmp_path, server)
    store.refresh(config.pipes["vo"], at=T0)
    before = store.path("vo").read_bytes()
    for moment in (T0 + 1, T0 + 599, T0 - 100):
        result = store.refresh(config.pipes["vo"], at=moment)
        assert (result.status, result.detail) == ("fresh", "cache is fresh")
        assert result.cached == CachedPipe(server.url(), T0, DOC)
    assert server.requests == 1
    assert store.path("vo").read_bytes() == before


def test_force_or_expiry_fetches_again(tmp_path: Path, server: PipeServer) -> None:
    _, config, store = http_setup(tmp_path, server)
    pipe = config.pipes["vo"]
    store.refresh(pipe, at=T0)
    newer = {"cache_seconds": 600, "machinetypes": [PROD]}
    server.serve(newer)
    forced = store.refresh(pipe, force=True, at=T0 + 10)
    assert forced.status == "fetched"
    assert server.requests == 2
    assert store.documents(config.pipes) == {"vo": newer}
    assert store.refresh(pipe, at=T0 + 609).status == "fresh"  # the clock restarted at T0 + 10
    expired = store.refresh(pipe, at=T0 + 610)
    assert expired.status == "fetched"
    assert expired.cached is not None and expired.cached.fetched_at == T0 + 610
    assert server.requests == 3


def test_refresh_without_at_uses_the_clock(tmp_path: Path, server: PipeServer) -> None:
    _, config, store = http_setup(tmp_path, server)
    assert store.refresh(config.pipes["vo"]).status == "fetched"
    assert store.refresh(config.pipes["vo"]).status == "fresh"
    assert server.requests == 1


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (120, 120),
        (None, DEFAULT_CACHE_SECONDS),
        (0, DEFAULT_CACHE_SECONDS),
        (-5, DEFAULT_CACHE_SECONDS),
        ("60", DEFAULT_CACHE_SECONDS),
        (1.5, DEFAULT_CACHE_SECONDS),
        (True, DEFAULT_CACHE_SECONDS),
    ],
)
def test_cache_seconds_defaults_to_an_hour(value: Any, seconds: int) -> None:
    document: dict[str, Any] = {"machinetypes": []}
    if value is not None:
        document["cache_seconds"] = value
    assert CachedPipe("https://x", T0, document).cache_seconds == seconds
    assert DEFAULT_CACHE_SECONDS == 3600


def _fail_500(server: PipeServer) -> None:
    server.serve("oops", status=500)


def _fail_not_json(server: PipeServer) -> None:
    server.serve("{not json")


def _fail_too_large(server: PipeServer) -> None:
    server.serve({"machinetypes": [], "padding": "x" * 5000})  # valid JSON, over max_bytes


def _fail_nested_too_deep(server: PipeServer) -> None:
    server.serve("[" * 2000 + "]" * 2000)  # valid JSON under max_bytes; json recurses too deep


def _fail_wrong_shape(server: PipeServer) -> None:
    server.serve({"machinetypes": {"suffix": "prod"}})


def _fail_refused(server: PipeServer) -> None:
    server.stop()


def _fail_not_utf8(server: PipeServer) -> None:
    server.serve(b'{"machinetypes": ["\xff"]}')


def _fail_utf16(server: PipeServer) -> None:
    server.serve(json.dumps(DOC).encode("utf-16"))  # json.loads alone would take it


def _fail_nan(server: PipeServer) -> None:
    server.serve('{"machinetypes": [], "cache_seconds": NaN}')


def _fail_nul_escape(server: PipeServer) -> None:
    server.serve('{"machinetypes": [{"suffix": "prod", "root_image": "x\\u0000"}]}')


def _fail_nested_deeper(server: PipeServer) -> None:
    server.serve('{"machinetypes": [' + "[" * 40 + "]" * 40 + "]}")


FAILURES = {
    "http-500": (_fail_500, "HTTPError: 500 Server Error"),
    "not-json": (_fail_not_json, ": not JSON: "),
    "too-large": (_fail_too_large, ": larger than 4096 bytes"),
    "nested-too-deep": (_fail_nested_too_deep, ": not JSON: "),
    "wrong-shape": (_fail_wrong_shape, ": expected an object with a 'machinetypes' list"),
    "connection-refused": (_fail_refused, ": ConnectionError: "),
    "not-utf8": (_fail_not_utf8, ": not UTF-8 text (byte 19)"),
    "utf16": (_fail_utf16, ": not UTF-8 text (byte 0)"),
    "nan": (_fail_nan, ": not JSON: NaN is no JSON number"),
    "nul-escape": (_fail_nul_escape, ": a text holds a NUL character: 'x\\x00'"),
    "nested-deeper": (_fail_nested_deeper, ": nested deeper than 32 levels"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_failed_refresh_keeps_the_last_good_copy(
    tmp_path: Path, server: PipeServer, failure: str
) -> None:
    path, config, store = http_setup(tmp_path, server, max_bytes=4096)
    pipe = config.pipes["vo"]
    assert store.refresh(pipe, at=T0).status == "fetched"
    good = store.path("vo").read_bytes()
    good_stat = store.path("vo").stat()

    make_it_fail, detail = FAILURES[failure]
    make_it_fail(server)
    for result in (store.refresh(pipe, force=True, at=T0 + 1), store.refresh(pipe, at=T0 + 700)):
        assert result.status == "failed"
        assert result.detail.startswith(server.url())
        assert detail in result.detail
        assert result.detail.endswith("; keeping the last good copy")
        assert "\n" not in result.detail
        assert result.cached == CachedPipe(server.url(), T0, DOC)
    assert server.requests == (1 if failure == "connection-refused" else 3)
    assert store.path("vo").read_bytes() == good
    assert store.path("vo").stat().st_ino == good_stat.st_ino
    assert [p.name for p in store.cache_dir.iterdir()] == ["vo.json"]  # no temporary leftovers

    loaded = load(path, store.documents(config.pipes))
    assert set(loaded.machinetypes) == {"vo-prod", "vo-test"}


def test_failure_with_no_copy_yet(tmp_path: Path, server: PipeServer) -> None:
    path, config, store = http_setup(tmp_path, server)
    server.serve("down", status=503)
    result = store.refresh(config.pipes["vo"], at=T0)
    assert result.status == "failed"
    assert result.cached is None
    assert result.detail.endswith("; no copy yet: its machinetypes wait")
    assert "503 Server Error" in result.detail
    assert "\n" not in result.detail
    assert not store.path("vo").exists()
    assert store.documents(config.pipes) == {}
    assert load(path, store.documents(config.pipes)).machinetypes == {}

    server.stop()  # refused as well: still no exception
    assert store.refresh(config.pipes["vo"], at=T0).status == "failed"


def test_url_change_invalidates_the_cached_copy(tmp_path: Path, server: PipeServer) -> None:
    _, config, store = http_setup(tmp_path, server)
    store.refresh(config.pipes["vo"], at=T0)
    path = write_config(tmp_path, {"url": server.url("/other.json"), "allow_http": True})
    moved = load(path)
    assert store.documents(moved.pipes) == {}  # the old copy describes another pipe
    assert load(path, store.documents(moved.pipes)).machinetypes == {}

    server.serve("gone", status=404)
    failed = store.refresh(moved.pipes["vo"], at=T0 + 1)  # within cache_seconds, still fetched
    assert (failed.status, failed.cached) == ("failed", None)
    assert failed.detail.endswith("no copy yet: its machinetypes wait")
    assert server.paths == ["/vo.json", "/other.json"]

    server.serve(DOC)
    assert store.refresh(moved.pipes["vo"], at=T0 + 2).status == "fetched"
    assert store.documents(moved.pipes) == {"vo": DOC}
    assert store.documents(config.pipes) == {}  # and now the old URL's is gone


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"url": "x"}',
        '{"url": "x", "fetched_at": "t", "document": {}}',
        '{"url": "x", "fetched_at": 1, "document": {"machinetypes": 5}}',
        '{"url": "x", "fetched_at": 1e999, "document": {"machinetypes": []}}',
        '{"url": "x", "fetched_at": ' + "9" * 400 + ', "document": {"machinetypes": []}}',
        b'{"url": "x", "fetched_at": 1, "document": {"machinetypes": ["\xc3"]}}',
        b"\x00\x01binary",
        "[" * 100000,
    ],
)
def test_unreadable_cache_is_ignored(
    tmp_path: Path, server: PipeServer, content: str | bytes
) -> None:
    _, config, store = http_setup(tmp_path, server)
    store.cache_dir.mkdir(parents=True)
    store.path("vo").write_bytes(content if isinstance(content, bytes) else content.encode())
    assert store.load("vo") is None
    assert store.documents(config.pipes) == {}
    assert store.refresh(config.pipes["vo"], at=T0).status == "fetched"
    assert store.documents(config.pipes) == {"vo": DOC}


def test_documents_only_of_configured_pipes(tmp_path: Path, server: PipeServer) -> None:
    _, config, store = http_setup(tmp_path, server)
    store.refresh(config.pipes["vo"], at=T0)
    assert store.documents({}) == {}
    assert store.load("other") is None


# --- expansion ----------------------------------------------------------------------------------


def test_names_and_share_split(tmp_path: Path) -> None:
    third = {**PROD, "suffix": "Idle", "target_share": 0}
    config = expand(
        tmp_path, PROD, TEST, third, {**PROD, "suffix": "none"} | {"target_share": None}
    )
    assert config.warnings == ()
    shares = {name: mt.target_share for name, mt in config.machinetypes.items()}
    # pipe 10 x entry share / (3 + 1 + 0 + 0)
    assert shares == {"vo-prod": 7.5, "vo-test": 2.5, "vo-idle": 0.0, "vo-none": 0.0}
    assert config.machinetypes["vo-prod"].name == "vo-prod"
    assert config.machinetypes["vo-prod"].pipe == "vo"
    assert config.machinetype_dir("vo-prod") == tmp_path / "state" / "machinetypes" / "vo"
    assert config.files_dir("vo-test") == tmp_path / "state" / "machinetypes" / "vo" / "files"


def test_share_split_with_text_and_float_shares(tmp_path: Path) -> None:
    config = expand(
        tmp_path,
        {**PROD, "target_share": "1.5"},
        {**TEST, "target_share": 0.5},
        pipe={"target_share": 4},
    )
    assert config.machinetypes["vo-prod"].target_share == 3.0
    assert config.machinetypes["vo-test"].target_share == 1.0


def test_all_zero_shares_give_zero(tmp_path: Path) -> None:
    config = expand(tmp_path, {**PROD, "target_share": 0}, {**TEST, "target_share": 0})
    assert [mt.target_share for mt in config.machinetypes.values()] == [0.0, 0.0]


@pytest.mark.parametrize(
    ("model", "backend"),
    [
        ("docker", BackendName.DOCKER),
        ("singularity", BackendName.APPTAINER),
        ("cernvm3", BackendName.VM),
        ("cernvm4", BackendName.VM),
        ("vm-raw", BackendName.VM),
        ("apptainer", BackendName.APPTAINER),  # lmrunner's own names pass through
        (None, BackendName.VM),  # Vac's default machine_model is cernvm3
    ],
)
def test_vac_names_are_mapped(tmp_path: Path, model: str | None, backend: BackendName) -> None:
    entry: dict[str, Any] = {"suffix": "x", "root_image": "image.iso"}
    if model is not None:
        entry["machine_model"] = model
    config = expand(tmp_path, entry)
    mt = config.machinetypes["vo-x"]
    assert mt.backend is backend
    assert mt.image == "image.iso"


def test_every_accepted_key_is_carried(tmp_path: Path) -> None:
    entry = {
        "suffix": "full",
        "accounting_fqan": "/vo/Role=pilot",
        "backoff_seconds": 11,
        "container_command": "/bin/run",
        "cvmfs_repositories": "vo.cern.ch grid.cern.ch",
        "fizzle_seconds": 12,
        "disk_gb_per_processor": 5,
        "heartbeat_file": "hb",
        "heartbeat_seconds": 13,
        "image_signing_dn": "^/DC=ch/.*",
        "legacy_proxy": True,
        "machine_model": "cernvm3",
        "max_processors": 8,
        "max_wallclock_seconds": 3600,
        "min_processors": 2,
        "min_wallclock_seconds": 600,
        "root_device": "sda",
        "root_image": "https://images.example.com/cernvm.iso",
        "scratch_device": "sdb",
        "target_share": 1,
        "tmp_binds": ["/scratch", "/tmp"],
        "user_data": "https://vo.example.com/user_data",
        "user_data_proxy": True,
    }
    config = expand(tmp_path, entry)
    assert config.warnings == ()
    mt = config.machinetypes["vo-full"]
    assert (mt.accounting_fqan, mt.backoff_seconds, mt.container_command) == (
        "/vo/Role=pilot",
        11,
        "/bin/run",
    )
    assert mt.cvmfs_repositories == ("vo.cern.ch", "grid.cern.ch")
    assert (mt.fizzle_seconds, mt.disk_gb_per_processor) == (12, 5.0)
    assert (mt.heartbeat_file, mt.heartbeat_seconds) == ("hb", 13)
    assert (mt.image_signing_dn, mt.legacy_proxy, mt.backend) == ("^/DC=ch/.*", True, "vm")
    assert (mt.min_processors, mt.max_processors) == (2, 8)
    assert (mt.min_wallclock_seconds, mt.max_wallclock_seconds) == (600, 3600)
    assert (mt.root_device, mt.scratch_device) == ("sda", "sdb")
    assert mt.image == "https://images.example.com/cernvm.iso"
    assert mt.target_share == 10.0
    assert mt.tmp_binds == ("/scratch", "/tmp")
    assert mt.user_data == "https://vo.example.com/user_data"
    assert mt.user_data_proxy is True


def test_keys_not_accepted_from_pipes_are_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entry = {
        **PROD,
        "image": "docker://evil/image",  # lmrunner's name, not accepted: root_image stands
        "backend": "vm",
        "files_dir": "/etc",
        "x509_cert": "/etc/shadow",
        "mjf_env_style": "file_url",
        "stop_grace_seconds": 1,
        "machines_dir_days": 0,
        "name": "evil",
        "pipe": "other",
        "__pipe__": "other",
        "total_processors": 99,
    }
    with caplog.at_level(logging.INFO, logger="lmrunner.pipes"):
        config = expand(tmp_path, entry)
    assert config.warnings == ()
    assert set(config.machinetypes) == {"vo-prod"}
    mt = config.machinetypes["vo-prod"]
    assert (mt.name, mt.pipe, mt.backend) == ("vo-prod", "vo", BackendName.DOCKER)
    assert mt.image == PROD["root_image"]
    assert (mt.files_dir, mt.x509_cert) == (None, None)
    assert (mt.mjf_env_style, mt.stop_grace_seconds, mt.machines_dir_days) == ("auto", 60, 3.0)
    ignored = [r.getMessage() for r in caplog.records if "ignoring key" in r.getMessage()]
    assert len(ignored) == 11
    assert any("ignoring key 'files_dir' (not accepted from pipes)" in m for m in ignored)


def test_precedence_local_over_overrides_over_json(tmp_path: Path) -> None:
    entry = {
        **PROD,
        "backoff_seconds": 100,
        "fizzle_seconds": 200,
        "heartbeat_seconds": 300,
        "max_wallclock_seconds": 1000,
    }
    config = expand(
        tmp_path,
        entry,
        TEST,
        pipe={
            "overrides": {"backoff_seconds": 1800, "fizzle_seconds": 400, "stop_grace_seconds": 5}
        },
        machinetypes={"vo-prod": {"backoff_seconds": 7, "image": "docker://local/prod:2"}},
    )
    assert config.warnings == ()
    prod = config.machinetypes["vo-prod"]
    assert prod.backoff_seconds == 7  # local
    assert prod.image == "docker://local/prod:2"  # local
    assert prod.fizzle_seconds == 400  # overrides
    assert prod.stop_grace_seconds == 5  # overrides may set any machinetype option
    assert prod.heartbeat_seconds == 300  # JSON
    assert prod.max_wallclock_seconds == 1000  # JSON
    assert prod.target_share == 7.5  # the split share
    test = config.machinetypes["vo-test"]
    assert (test.backoff_seconds, test.fizzle_seconds) == (1800, 400)


def test_option_families_merge_name_by_name(tmp_path: Path) -> None:
    entry = {
        **PROD,
        "user_data_option_a": "json-a",
        "user_data_option_b": "json-b",
        "user_data_file_f": "json-f.pem",
        "user_data_file_g": "json-g.pem",
    }
    config = expand(
        tmp_path,
        entry,
        pipe={
            "overrides": {
                "user_data_options": {"b": "over-b", "c": "over-c"},
                "user_data_files": {"g": "/etc/over-g.pem"},
            }
        },
        machinetypes={
            "vo-prod": {
                "user_data_options": {"c": "local-c", "d": "local-d"},
                "user_data_files": {"h": "local-h.pem"},
            }
        },
    )
    mt = config.machinetypes["vo-prod"]
    assert dict(mt.user_data_options) == {
        "a": "json-a",
        "b": "over-b",
        "c": "local-c",
        "d": "local-d",
    }
    assert dict(mt.user_data_files) == {
        "f": "json-f.pem",
        "g": "/etc/over-g.pem",
        "h": "local-h.pem",
    }


def test_local_option_family_merges_with_json_alone(tmp_path: Path) -> None:
    entry = {**PROD, "user_data_option_a": "json-a"}
    config = expand(
        tmp_path, entry, machinetypes={"vo-prod": {"user_data_options": {"b": "local-b"}}}
    )
    assert dict(config.machinetypes["vo-prod"].user_data_options) == {
        "a": "json-a",
        "b": "local-b",
    }


UNSAFE: dict[str, tuple[dict[str, Any], str]] = {
    "user_data_file-slash": (
        {"user_data_file_cert": "../../etc/shadow"},
        "user_data_file_cert may not contain '/'",
    ),
    "user_data_file-absolute": (
        {"user_data_file_cert": "/etc/shadow"},
        "user_data_file_cert may not contain '/'",
    ),
    "user_data_file-not-text": (
        {"user_data_file_cert": ["x"]},
        "user_data_file_cert may not contain '/'",
    ),
    "cvmfs-list": (
        {"cvmfs_repositories": ["vo.cern.ch", "../etc"]},
        "cvmfs_repositories may not contain '/'",
    ),
    "cvmfs-text": (
        {"cvmfs_repositories": "vo.cern.ch a/b"},
        "cvmfs_repositories may not contain '/'",
    ),
    "heartbeat_file": ({"heartbeat_file": "../../hb"}, "heartbeat_file may not contain '/'"),
    "user_data-dotdot": (
        {"user_data": "https://vo.example.com/a/../b"},
        "user_data 'https://vo.example.com/a/../b' must be a plain file name or an https URL",
    ),
    "user_data-absolute": (
        {"user_data": "/etc/passwd"},
        "user_data '/etc/passwd' must be a plain file name or an https URL",
    ),
    "user_data-relative-path": (
        {"user_data": "sub/user_data"},
        "user_data 'sub/user_data' must be a plain file name or an https URL",
    ),
    "user_data-http": (
        {"user_data": "http://vo.example.com/ud"},
        "user_data 'http://vo.example.com/ud' must be a plain file name or an https URL",
    ),
    "root_image-absolute": (
        {"root_image": "/etc/image.img"},
        "root_image '/etc/image.img' must be a file name, docker://, /cvmfs/ or https",
    ),
    "root_image-relative-path": (
        {"root_image": "sub/image.img"},
        "root_image 'sub/image.img' must be a file name, docker://, /cvmfs/ or https",
    ),
    "root_image-cvmfs-dotdot": (
        {"root_image": "/cvmfs/../etc/image"},
        "root_image '/cvmfs/../etc/image' must be a file name, docker://, /cvmfs/ or https",
    ),
    "root_image-file-url": (
        {"root_image": "file:///etc/image"},
        "root_image 'file:///etc/image' must be a file name, docker://, /cvmfs/ or https",
    ),
    "root_image-http-without-allow_http": (
        {"root_image": "http://images.example.com/x.iso"},
        "root_image 'http://images.example.com/x.iso' must be a file name, docker://, /cvmfs/ "
        "or https",
    ),
}


@pytest.mark.parametrize("case", list(UNSAFE))
def test_each_path_safety_rule_rejects_only_its_entry(tmp_path: Path, case: str) -> None:
    change, problem = UNSAFE[case]
    bad = {**TEST, "suffix": "bad", **change}
    config = expand(tmp_path, PROD, bad, TEST)
    assert set(config.machinetypes) == {"vo-prod", "vo-test"}
    assert config.warnings == (f"pipe vo ({PIPE_URL}) entry 1 'bad': rejected: {problem}",)
    # The rejected entry's share no longer counts.
    assert config.machinetypes["vo-prod"].target_share == 7.5


@pytest.mark.parametrize(
    "change",
    [
        {"user_data_file_cert": "cert.pem"},
        {"cvmfs_repositories": ["vo.cern.ch", "grid.cern.ch"]},
        {"cvmfs_repositories": "vo.cern.ch grid.cern.ch"},
        {"heartbeat_file": "heartbeat"},
        {"user_data": "vo.user_data"},
        {"user_data": "https://vo.example.com/user_data"},
        {"root_image": "image.qcow2"},
        {"root_image": "docker://registry.example.com:5000/vo/image:1"},
        {"root_image": "/cvmfs/unpacked.cern.ch/vo/image"},
        {"root_image": "https://images.example.com/x.iso"},
    ],
)
def test_safe_paths_are_accepted(tmp_path: Path, change: dict[str, Any]) -> None:
    config = expand(tmp_path, {**TEST, **change})
    assert config.warnings == ()
    assert set(config.machinetypes) == {"vo-test"}


def test_http_image_only_with_allow_http(tmp_path: Path) -> None:
    entry = {**TEST, "root_image": "http://images.example.com/x.iso"}
    pipe = {"url": "http://pipes.example.com/vo.json", "allow_http": True}
    config = expand(tmp_path, entry, pipe=pipe, factory={"allow_http": True})
    assert config.warnings == ()
    assert config.machinetypes["vo-test"].image == "http://images.example.com/x.iso"


@pytest.mark.parametrize("factory_allows", [True, False])
def test_http_user_data_needs_both_the_pipes_and_the_factorys_allow_http(
    tmp_path: Path, factory_allows: bool
) -> None:
    # The pipe's allow_http lets its entries name http URLs; downloading them (user_data at
    # every start, as Vac did) is the factory's decision. Refused, the entry alone goes.
    entry = {**TEST, "suffix": "bad", "user_data": "http://vo.example.com/ud"}
    url = "http://pipes.example.com/vo.json"
    config = expand(tmp_path, PROD, entry, pipe={"url": url, "allow_http": True},
                    factory={"allow_http": factory_allows})  # fmt: skip
    if factory_allows:
        assert set(config.machinetypes) == {"vo-prod", "vo-bad"}
        assert config.machinetypes["vo-bad"].user_data == "http://vo.example.com/ud"
        return
    assert set(config.machinetypes) == {"vo-prod"}
    assert len(config.warnings) == 1
    assert "machinetypes.vo-bad.user_data: 'http://vo.example.com/ud': http:// needs " \
        "factory.allow_http: true" in config.warnings[0]  # fmt: skip
    assert config.warnings[0].endswith("; machinetype ignored")


MALFORMED: dict[str, tuple[Any, str]] = {
    "not-an-object": ("prod", "entry 1: rejected: expected an object"),
    "no-suffix": (
        {"root_image": "x.iso"},
        "entry 1: rejected: 'suffix' must be a name of letters, digits and '-'",
    ),
    "suffix-with-slash": (
        {**TEST, "suffix": "a/b"},
        "entry 1: rejected: 'suffix' must be a name of letters, digits and '-'",
    ),
    "suffix-not-ascii": (
        {**TEST, "suffix": "straße"},
        "entry 1: rejected: 'suffix' must be a name of letters, digits and '-'",
    ),
    "suffix-not-text": (
        {**TEST, "suffix": 7},
        "entry 1: rejected: 'suffix' must be a name of letters, digits and '-'",
    ),
    "share-not-a-number": (
        {**TEST, "suffix": "bad", "target_share": "lots"},
        "entry 1 'bad': rejected: target_share must be a number >= 0, got 'lots'",
    ),
    "share-negative": (
        {**TEST, "suffix": "bad", "target_share": -4},
        "entry 1 'bad': rejected: target_share must be a number >= 0, got -4",
    ),
    "share-boolean": (
        {**TEST, "suffix": "bad", "target_share": True},
        "entry 1 'bad': rejected: target_share must be a number >= 0, got True",
    ),
    "no-image": (
        {"suffix": "bad", "machine_model": "docker"},
        "entry 1 'bad': rejected: machinetypes.vo-bad.image: required; ",
    ),
    "unknown-model": (
        {**TEST, "suffix": "bad", "machine_model": "xen"},
        "entry 1 'bad': rejected: machinetypes.vo-bad.backend: expected one of 'docker', "
        "'apptainer', 'vm', 'fake', got 'xen'",
    ),
    "bad-value": (
        {**TEST, "suffix": "bad", "max_processors": "many"},
        "entry 1 'bad': rejected: machinetypes.vo-bad.max_processors: expected an integer >= 1",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_entry_is_rejected_and_the_others_load(tmp_path: Path, case: str) -> None:
    bad, message = MALFORMED[case]
    config = expand(tmp_path, PROD, bad, TEST)
    assert set(config.machinetypes) == {"vo-prod", "vo-test"}
    assert len(config.warnings) == 1
    assert config.warnings[0].startswith(f"pipe vo ({PIPE_URL}) {message}")
    assert "\n" not in config.warnings[0]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            {"image_signing_dn": "(CN=x"},
            "image_signing_dn: expected a regular expression (missing ), unterminated subpattern "
            "at position 0)",
        ),
        (
            {"min_processors": 4, "max_processors": 2},
            "max_processors: expected at least min_processors (4), got 2",
        ),
    ],
)
def test_entry_failing_checks_across_options_is_rejected_alone(
    tmp_path: Path, bad: dict[str, Any], message: str
) -> None:
    # Each value is fine on its own; together they are not: only the entry may go.
    config = expand(tmp_path, PROD, {**TEST, "suffix": "bad", **bad}, TEST)
    assert set(config.machinetypes) == {"vo-prod", "vo-test"}
    assert config.warnings == (
        f"pipe vo ({PIPE_URL}) entry 1 'bad': machinetypes.vo-bad.{message}; machinetype ignored",
    )


def test_overrides_can_complete_an_entry(tmp_path: Path) -> None:
    config = expand(
        tmp_path,
        {"suffix": "prod", "root_image": "docker://vo/prod"},
        pipe={"overrides": {"backend": "docker"}},
    )
    assert config.machinetypes["vo-prod"].backend is BackendName.DOCKER


def test_document_without_machinetypes_gives_none(tmp_path: Path) -> None:
    config = expand(tmp_path, document={"cache_seconds": 60})
    assert config.machinetypes == {}
    assert config.warnings == ()


def test_local_section_for_a_type_the_pipe_does_not_offer(tmp_path: Path) -> None:
    path = tmp_path / "lmrunner.yaml"
    path.write_text(
        f"""\
factory:
  space: space.example.com
  state_dir: {tmp_path / "state"}
vacuum_pipes:
  vo:
    url: {PIPE_URL}
    target_share: 10
machinetypes:
  vo-gone:
    backoff_seconds: 5
  vo-own:
    backend: docker
    image: docker://local/own
"""
    )
    warning = (
        f"{path}:9: machinetypes.vo-gone: pipe 'vo' offers no such machinetype (yet); "
        "section ignored"
    )
    for documents in ({"vo": DOC}, None):
        config = load(path, documents)
        assert config.warnings == (warning,)
        assert "vo-gone" not in config.machinetypes
        own = config.machinetypes["vo-own"]  # complete on its own: loads, not a pipe type
        assert (own.pipe, own.image) == (None, "docker://local/own")
    assert set(load(path, {"vo": DOC}).machinetypes) == {"vo-own", "vo-prod", "vo-test"}


# --- configuration errors -----------------------------------------------------------------------


def _config_error(tmp_path: Path, pipe_text: str) -> ConfigError:
    path = tmp_path / "lmrunner.yaml"
    path.write_text(
        f"factory:\n  space: space.example.com\n  state_dir: {tmp_path}\nvacuum_pipes:\n  vo:\n"
        + pipe_text
    )
    with pytest.raises(ConfigError) as caught:
        load(path)
    return caught.value


def test_http_url_without_allow_http_is_an_error(tmp_path: Path) -> None:
    err = _config_error(tmp_path, "    target_share: 1\n    url: http://pipes.example.com/vo\n")
    assert err.errors == (
        f"{tmp_path / 'lmrunner.yaml'}:7: vacuum_pipes.vo.url: expected an https:// URL "
        "(or allow_http: true), got 'http://pipes.example.com/vo'",
    )


def test_other_schemes_are_errors_even_with_allow_http(tmp_path: Path) -> None:
    err = _config_error(tmp_path, "    url: ftp://pipes.example.com/vo\n    allow_http: true\n")
    assert err.errors == (
        f"{tmp_path / 'lmrunner.yaml'}:6: vacuum_pipes.vo.url: expected an https:// or http:// "
        "URL, got 'ftp://pipes.example.com/vo'",
    )


def test_unknown_key_in_overrides_is_an_error(tmp_path: Path) -> None:
    err = _config_error(
        tmp_path,
        f"    url: {PIPE_URL}\n    overrides:\n      fizzle_seconds: 60\n      bakoff_seconds: 5\n",
    )
    assert err.errors == (
        f"{tmp_path / 'lmrunner.yaml'}:9: vacuum_pipes.vo.overrides.bakoff_seconds: "
        "unknown key; did you mean 'backoff_seconds'?",
    )
    assert str(err) == err.errors[0]


def test_bad_value_in_overrides_is_an_error(tmp_path: Path) -> None:
    err = _config_error(
        tmp_path, f"    url: {PIPE_URL}\n    overrides:\n      backoff_seconds: -1\n"
    )
    assert err.errors == (
        f"{tmp_path / 'lmrunner.yaml'}:8: vacuum_pipes.vo.overrides.backoff_seconds: "
        "expected an integer >= 0, got -1",
    )


# --- rejections that must not disturb the other entries ---------------------------------------


def test_duplicate_suffix_is_rejected_once(tmp_path: Path) -> None:
    config = expand(tmp_path, PROD, {**PROD, "suffix": "PROD"}, TEST)
    assert set(config.machinetypes) == {"vo-prod", "vo-test"}
    assert len(config.warnings) == 1
    assert config.warnings[0].endswith("rejected: suffix 'prod' given twice")


def test_rejected_entries_take_no_share(tmp_path: Path) -> None:
    bad = {**TEST, "suffix": "bad", "max_processors": "many", "target_share": 100}
    config = expand(tmp_path, PROD, TEST, bad)
    shares = {name: mt.target_share for name, mt in config.machinetypes.items()}
    assert shares == {"vo-prod": 7.5, "vo-test": 2.5}


def test_pipe_type_whose_file_is_missing_is_ignored_alone(tmp_path: Path) -> None:
    path = write_config(tmp_path, None, None)
    files = tmp_path / "state" / "machinetypes" / "vo" / "files"
    files.mkdir(parents=True)
    (files / "prod.ud").write_text("#!/bin/sh\n")
    entries = [{**PROD, "user_data": "prod.ud"}, {**TEST, "user_data": "missing.ud"}]
    config = load(path, {"vo": {"machinetypes": entries}}, check_files=True)
    assert set(config.machinetypes) == {"vo-prod"}
    assert config.warnings == (
        f"machinetypes.vo-test: machinetypes.vo-test.user_data: expected a readable file, "
        f"{files / 'missing.ud'} is not; machinetype ignored",
    )


def test_https_pipe_redirected_to_http_is_refused(tmp_path: Path, server: PipeServer) -> None:
    class Redirected:
        url = server.url()  # where a redirect from https ended up

        def __enter__(self) -> Redirected:
            return self

        def __exit__(self, *args: object) -> None:
            return None

        def raise_for_status(self) -> None:
            return None

        def iter_content(self, size: int) -> Iterator[bytes]:
            yield b'{"machinetypes": []}'

    class Session(requests.Session):
        def get(self, *args: Any, **kwargs: Any) -> Any:
            return Redirected()

    path = write_config(tmp_path, {"url": "https://pipes.example.com/vo.json"})
    config = load(path)
    store = PipeStore(config.factory.state_dir / "pipescache", session=Session())
    result = store.refresh(config.pipes["vo"], at=T0)
    assert result.status == "failed"
    assert "redirected to http://127.0.0.1" in result.detail
    assert "which is not https" in result.detail


def test_unreadable_cache_warning_names_file_and_byte(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = PipeStore(tmp_path)
    store.path("vo").write_bytes(b'{"url": "\xff"}')
    with caplog.at_level(logging.WARNING, logger="lmrunner.pipes"):
        assert store.load("vo") is None
    assert caplog.messages == [
        f"pipe vo: ignoring the cached copy: {store.path('vo')}: not UTF-8 text (byte 9)"
    ]
    store.path("vo").unlink()
    store.path("vo").mkdir()  # a folder where the copy belongs
    assert store.load("vo") is None
    assert caplog.messages[-1].endswith(f"{store.path('vo')}: cannot read: Is a directory")
