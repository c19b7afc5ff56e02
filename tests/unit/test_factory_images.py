"""The factory and remote images (lmrunner.factory with lmrunner.images): a machinetype whose
image is not downloaded yet waits, the others start; a ready copy's path is what the engine gets.

Most tests give the factory a stub cache whose states the test sets; the last ones a real
ImageCache downloading from a local HTTP server (tests.unit.test_images.ImageServer).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Collection, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from lmrunner.backends.base import Backend, Handle, MachineSpec
from lmrunner.config import Config
from lmrunner.factory import CLEANUP_SECONDS, Factory
from lmrunner.images import DownloadSettings, ImageCache, ImageState, entry_key
from lmrunner.lifecycle import LmState
from tests.unit.test_factory import LONG, TUNING, Env, QuietFake
from tests.unit.test_images import BODY, ImageServer, Resource

URL = "https://images.example.com/vo/cernvm4.iso"
OTHER = "https://images.example.com/vo/other.iso"
LOGGER = "lmrunner.factory"


class ImageFake(QuietFake):
    """The quiet fake, remembering the image each start was given. A fake LM's script is its
    image name, so a local copy (a path) runs the LONG script."""

    def __init__(self, engine_dir: Path, clock: Callable[[], float]) -> None:
        super().__init__(engine_dir, clock=clock)
        self.images: dict[str, str] = {}  # machinetype -> the image validate and start got

    def validate(self, spec: MachineSpec) -> None:
        self.images[spec.machinetype] = spec.image
        super().validate(_scripted(spec))

    def start(self, spec: MachineSpec) -> Handle:
        assert self.images[spec.machinetype] == spec.image
        return super().start(_scripted(spec))


def _scripted(spec: MachineSpec) -> MachineSpec:
    return spec if spec.image.startswith("fake:") else replace(spec, image=LONG)


class StubImages(ImageCache):
    """An ImageCache whose states the test sets (downloading until told otherwise); it records
    what the factory asked, pruned and closed."""

    def __init__(self, root: Path, settings: DownloadSettings, clock: Callable[[], float]) -> None:
        super().__init__(root, settings, clock=clock)
        self.states: dict[str, ImageState] = {}
        self.asked: list[tuple[str, str | None]] = []
        self.pruned: list[set[str]] = []
        self.closed = 0

    def get(self, url: str, digest: str | None = None) -> ImageState:
        self.asked.append((url, digest))
        return self.states.get(url, downloading(url))

    def prune(self, in_use: Collection[str]) -> list[Path]:
        self.pruned.append(set(in_use))
        return []

    def close(self) -> None:
        self.closed += 1
        super().close()


def downloading(url: str, received: str = "0 bytes") -> ImageState:
    return ImageState("downloading", None, f"downloading {url}: {received}")


def failed(url: str, left: int = 30) -> ImageState:
    return ImageState("failed", None, f"{url}: HTTP 404 Not Found; next try in {left} s")


def ready(path: Path, note: str = "downloaded 13.0 kB") -> ImageState:
    return ImageState("ready", path, note)


class ImageEnv(Env):
    """Env with the recording fake backend and factories given an image cache."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.recording = ImageFake(self.state_dir / "fake-engine", clock=self.clock)
        self.backend = self.recording

    def remote_config(self, *, cpus: int = 2, zero: bool = False, **factory: Any) -> Config:
        """``remote`` (image URL) and ``local`` (a fake script), one processor each; with
        ``zero``, ``idle`` too (OTHER, target_share 0)."""
        types: dict[str, dict[str, Any]] = {
            "remote": {"backend": "fake", "image": URL, "target_share": 1},
            "local": {"backend": "fake", "image": LONG, "target_share": 1},
        }
        if zero:
            types["idle"] = {"backend": "fake", "image": OTHER, "target_share": 0}
        return self.config(cpus=cpus, machinetypes=types, factory=factory or None)

    def stub(self, config: Config) -> StubImages:
        return StubImages(
            config.factory.state_dir / "images", DownloadSettings.of(config.factory), self.clock
        )

    def with_images(self, config: Config, images: ImageCache | None) -> Factory:
        made = Factory(
            config,
            self.store,
            {"fake": self.recording},
            tuning=TUNING,
            clock=self.clock,
            rng=random.Random(0),
            load_average=lambda: (0.0, 0.0, 0.0),
            images=images,
        )
        self.factories.append(made)
        return made

    def running(self) -> dict[str, int]:
        """Active LMs per machinetype."""
        out: dict[str, int] = {}
        for record in self.store.active():
            assert record.state is LmState.RUNNING
            out[record.machinetype] = out.get(record.machinetype, 0) + 1
        return out


@pytest.fixture
def env(tmp_path: Path) -> Iterator[ImageEnv]:
    made = ImageEnv(tmp_path)
    yield made
    made.close()


def image_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " image=" in r.getMessage()]


# --- waiting for a download ---------------------------------------------------------------------


@pytest.mark.parametrize("state", [downloading(URL), failed(URL)], ids=["downloading", "failed"])
def test_a_machinetype_waits_for_its_image_and_the_others_start(
    env: ImageEnv, state: ImageState
) -> None:
    config = env.remote_config(cpus=2)
    images = env.stub(config)
    images.states[URL] = state
    factory = env.with_images(config, images)
    for offset in (0, 10, 20):
        env.pass_at(factory, offset)
    assert env.running() == {"local": 2}  # the local type has the free processors meanwhile
    assert env.recording.images == {"local": LONG}
    assert (URL, None) in images.asked  # the download was asked for
    assert factory.image_state("remote") == state
    assert factory.image_state("local") is None  # no remote image


def test_once_the_image_is_ready_its_lm_starts_with_the_local_copy(env: ImageEnv) -> None:
    config = env.config(
        cpus=1, machinetypes={"remote": {"backend": "fake", "image": URL, "target_share": 1}}
    )
    images = env.stub(config)
    factory = env.with_images(config, images)
    for offset in (0, 10):
        assert env.pass_at(factory, offset).started == []
    assert env.store.active() == []
    copy = images.root / entry_key(URL) / "cernvm4.iso"
    images.states[URL] = ready(copy)
    report = env.pass_at(factory, 20)
    assert len(report.started) == 1
    assert env.running() == {"remote": 1}
    assert env.recording.images == {"remote": str(copy)}  # the local copy, never the URL


def test_a_ready_image_shares_the_host_with_the_other_types(env: ImageEnv) -> None:
    config = env.remote_config(cpus=2)
    images = env.stub(config)
    copy = images.root / entry_key(URL) / "cernvm4.iso"
    images.states[URL] = ready(copy)
    factory = env.with_images(config, images)
    env.pass_at(factory, 0)
    assert env.running() == {"local": 1, "remote": 1}
    assert env.recording.images == {"local": LONG, "remote": str(copy)}


def test_the_image_digest_is_asked_for(env: ImageEnv) -> None:
    digest = "sha256:" + "ab" * 32
    config = env.config(
        cpus=1,
        machinetypes={
            "remote": {"backend": "fake", "image": URL, "image_digest": digest, "target_share": 1}
        },
    )
    images = env.stub(config)
    images.states[URL] = ready(images.root / "copy.iso")
    factory = env.with_images(config, images)
    env.pass_at(factory, 0)
    assert env.running() == {"remote": 1}
    assert images.asked and set(images.asked) == {(URL, digest)}


def test_a_copy_gone_between_plan_and_start_fails_that_start_only(env: ImageEnv) -> None:
    config = env.config(
        cpus=1, machinetypes={"remote": {"backend": "fake", "image": URL, "target_share": 1}}
    )
    images = env.stub(config)
    answers = iter([ready(images.root / "copy.iso"), failed(URL)])
    images.get = lambda url, digest=None: next(answers)  # type: ignore[method-assign]
    factory = env.with_images(config, images)
    report = env.pass_at(factory, 0)
    assert report.started == []
    assert env.store.active() == []
    assert "remote" not in env.recording.images  # the backend never saw it


def test_a_machinetype_with_target_share_0_downloads_nothing(env: ImageEnv) -> None:
    config = env.remote_config(zero=True)
    images = env.stub(config)
    images.states[URL] = ready(images.root / "copy.iso")
    factory = env.with_images(config, images)
    for offset in (0, 10):
        env.pass_at(factory, offset)
    assert env.running() == {"remote": 1, "local": 1}
    assert OTHER not in {url for url, _ in images.asked}


def test_a_real_cache_starts_no_download_for_target_share_0(env: ImageEnv) -> None:
    config = env.config(
        cpus=1, machinetypes={"idle": {"backend": "fake", "image": OTHER, "target_share": 0}}
    )
    factory = env.with_images(config, None)  # the factory's own ImageCache
    for offset in (0, 10):
        env.pass_at(factory, offset)
    assert factory.images.entries() == []
    assert list(factory.images.root.iterdir()) == []


# --- logging ------------------------------------------------------------------------------------


def test_the_image_state_is_logged_once_per_change(
    env: ImageEnv, caplog: pytest.LogCaptureFixture
) -> None:
    config = env.remote_config()
    images = env.stub(config)
    factory = env.with_images(config, images)
    copy = images.root / "copy.iso"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for offset in (0, 5, 10):
            env.pass_at(factory, offset)
        images.states[URL] = failed(URL)
        for offset in (15, 20):
            env.pass_at(factory, offset)
        images.states[URL] = ready(copy)
        for offset in (25, 30, 35):
            env.pass_at(factory, offset)
    assert image_lines(caplog) == [
        f"machinetype=remote image={URL}: downloading: downloading {URL}: 0 bytes",
        f"machinetype=remote image={URL}: failed: {URL}: HTTP 404 Not Found; next try in 30 s",
        f"machinetype=remote image={URL}: ready: downloaded 13.0 kB",
    ]
    levels = [r.levelno for r in caplog.records if " image=" in r.getMessage()]
    assert levels == [logging.INFO, logging.ERROR, logging.INFO]


def test_download_progress_is_not_logged_on_every_pass(
    env: ImageEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """A download's detail carries its progress (ImageCache: "downloading URL: 1.0 MB of
    4.0 GB"); a pass runs at least every idle_wait_seconds while processors are free."""
    config = env.remote_config()
    images = env.stub(config)
    factory = env.with_images(config, images)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for step in range(1, 5):
            images.states[URL] = downloading(URL, f"{step}.0 MB of 4.0 GB")
            env.pass_at(factory, step * 5)
    assert len(image_lines(caplog)) == 1, image_lines(caplog)


# --- prune and reconfigure ----------------------------------------------------------------------


def test_prune_runs_in_the_hourly_cleanup_with_the_urls_in_use(env: ImageEnv) -> None:
    config = env.remote_config(zero=True)
    images = env.stub(config)
    factory = env.with_images(config, images)
    env.pass_at(factory, 0)  # reconcile_seconds=0: a reconcile every pass, cleanup hourly
    assert images.pruned == [{URL, OTHER}]  # every remote image configured, share or not
    for offset in (10, 600, CLEANUP_SECONDS - 1):
        env.pass_at(factory, offset)
    assert len(images.pruned) == 1
    env.pass_at(factory, CLEANUP_SECONDS)
    assert images.pruned == [{URL, OTHER}, {URL, OTHER}]


def test_reconfigure_with_new_download_settings_makes_a_new_cache(env: ImageEnv) -> None:
    config = env.remote_config()
    images = env.stub(config)
    factory = env.with_images(config, images)
    env.pass_at(factory, 0)

    def make(name: str) -> Backend | None:
        return ImageFake(env.state_dir / "fake-engine", env.clock)

    # Machinetypes only: the download settings are the same, the cache stays.
    fewer = env.config(cpus=2, machinetypes={"local": {"backend": "fake", "image": LONG,
                                                       "target_share": 1}})  # fmt: skip
    factory.reconfigure(fewer, make)
    assert factory.images is images and images.closed == 0
    # A factory setting that is no download setting: the cache stays too.
    factory.reconfigure(env.remote_config(hs06_per_processor=10.0), make)
    assert factory.images is images and images.closed == 0

    bigger = env.remote_config(hs06_per_processor=10.0, image_max_gb=50, allow_http=True)
    factory.reconfigure(bigger, make)
    assert images.closed == 1
    fresh = factory.images
    assert fresh is not images and type(fresh) is ImageCache
    assert fresh.root == images.root == env.state_dir / "images"
    assert fresh.settings == DownloadSettings.of(bigger.factory)
    assert fresh.settings.max_bytes == 50 * 10**9 and fresh.settings.allow_http
    assert fresh.clock is env.clock


# --- a real cache, a real download --------------------------------------------------------------


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[ImageServer]:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                 "ALL_PROXY"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    httpd = ImageServer()
    httpd.resources["/cernvm4.iso"] = Resource()
    yield httpd
    httpd.stop()


def served_config(env: ImageEnv, url: str) -> Config:
    return env.config(
        cpus=1,
        factory={"allow_http": True},
        machinetypes={"remote": {"backend": "fake", "image": url, "target_share": 1}},
    )


def test_a_real_download_lets_the_machinetype_start(env: ImageEnv, server: ImageServer) -> None:
    url = server.url()
    factory = env.with_images(served_config(env, url), None)
    assert env.pass_at(factory, 0).started == []
    state = factory.images.wait(url, 10)
    assert state.status == "ready", state
    env.pass_at(factory, 1)
    assert env.running() == {"remote": 1}
    copy = Path(env.recording.images["remote"])
    assert copy == env.state_dir / "images" / entry_key(url) / "cernvm4.iso"
    assert copy.read_bytes() == BODY
    assert server.count() == 1


def test_a_failed_download_is_logged_once_until_its_next_try(
    env: ImageEnv, server: ImageServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The cache's detail for a failed image counts down to the next try ("next try in 25 s");
    the factory must not log an error for it on every pass."""
    url = server.url("/missing.iso")
    factory = env.with_images(served_config(env, url), None)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        env.pass_at(factory, 0)
        assert factory.images.wait(url, 10).status == "failed"
        for offset in (5, 10, 15, 20):  # the first retry comes after 30 s
            env.pass_at(factory, offset)
    assert env.store.active() == []
    assert server.count("/missing.iso") == 1
    errors = [r.getMessage() for r in caplog.records
              if r.levelno == logging.ERROR and " image=" in r.getMessage()]  # fmt: skip
    assert len(errors) == 1, errors
