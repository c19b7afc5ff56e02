"""What an LM is given (lmrunner.payload): user_data templating, MJF, joboutputs, mounts, env."""

from __future__ import annotations

import io
import os
import stat
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import requests
import yaml

from lmrunner import __version__, runner
from lmrunner.backends import PLACEMENTS
from lmrunner.config import Config, MjfEnvStyle
from lmrunner.errors import ConfigError
from lmrunner.loader import load_config
from lmrunner.model import MIB, Limits, Mount
from lmrunner.payload import (
    LmIdentity,
    PayloadError,
    TemplateValues,
    features,
    limits_for,
    lm_name,
    mjf_locations,
    new_identity,
    prepare,
    render_user_data,
    template_values,
    update_shutdowntime,
)
from lmrunner.proxy import proxy_not_after

HOST = "factory01.example.com"
SPACE = "space.example.com"
LM = "factory01-03.example.com"
CREATED = 1_700_000_000
SHUTDOWN = CREATED + 7200
# Tests run as root: give the LM's files to nobody, as the factory gives them to the LM account.
OWNER = (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())

#: In-LM locations of machinefeatures, jobfeatures and joboutputs per backend (vac.md §4.5).
LOCATIONS = {
    "docker": ("/etc/machinefeatures", "/etc/jobfeatures", "/var/spool/joboutputs"),
    "apptainer": ("/tmp/machinefeatures", "/tmp/jobfeatures", "/tmp/joboutputs"),
    "vm": ("/etc/machinefeatures", "/etc/jobfeatures", "/var/spool/joboutputs"),
}
#: Vac's VM metadata service (vac.md §4.5): VMs serve MJF over HTTP, containers do not.
HTTP_LOCATIONS = tuple(f"http://169.254.169.253/{n}" for n in ("machinefeatures", "jobfeatures",
                                                               "joboutputs"))  # fmt: skip


def expected_locations(backend: str, style: MjfEnvStyle) -> tuple[str, ...] | None:
    """What $MACHINEFEATURES, $JOBFEATURES and $JOBOUTPUTS are; None when the style cannot be."""
    if style is MjfEnvStyle.HTTP or (style is MjfEnvStyle.AUTO and backend == "vm"):
        return HTTP_LOCATIONS if backend == "vm" else None
    prefix = "file://" if style is MjfEnvStyle.FILE_URL else ""
    return tuple(prefix + p for p in LOCATIONS[backend])


#: Every fixed pattern of vac.md §5.2 (the option/file families are tested separately).
FIXED_PATTERNS = (
    "url",
    "space",
    "machinetype",
    "vmtype",
    "machine_hostname",
    "vm_hostname",
    "manager_version",
    "vmlm_version",
    "manager_hostname",
    "vmlm_hostname",
    "machinefeatures_url",
    "jobfeatures_url",
    "joboutputs_url",
    "root_image_url",
    "uuid",
    "site",
)


@pytest.fixture(autouse=True)
def _umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


# --- helpers ------------------------------------------------------------------------------------


def load(
    tmp_path: Path,
    factory: Mapping[str, Any] | None = None,
    vo: Mapping[str, Any] | None = None,
    *,
    check_files: bool = False,
) -> Config:
    """A configuration with one machinetype ``vo`` (docker unless ``vo`` says otherwise)."""
    data = {
        "factory": {"space": SPACE, "state_dir": str(tmp_path / "state"), **(factory or {})},
        "machinetypes": {"vo": {"backend": "docker", "image": "docker://vo/image", **(vo or {})}},
    }
    path = tmp_path / "lmrunner.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, hostname=HOST, cpus=8, check_files=check_files)


def files_dir(tmp_path: Path, files: Mapping[str, str] | None = None) -> Path:
    """The machinetype's files/ folder, with ``files`` written into it."""
    folder = tmp_path / "state" / "machinetypes" / "vo" / "files"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
    return folder


def identity() -> LmIdentity:
    return new_identity(LM, "vo")


def run_prepare(
    config: Config,
    lm: LmIdentity | None = None,
    *,
    processors: int = 2,
    created: int = CREATED,
    shutdown_time: int = SHUTDOWN,
    session: requests.Session | None = None,
) -> tuple[Path, Any]:
    mt = config.machinetypes["vo"]
    lm_dir = config.factory.state_dir / "machines" / LM
    prepared = prepare(
        config,
        mt,
        lm or identity(),
        placement=PLACEMENTS[mt.backend],
        limits=limits_for(config, mt, processors),
        created=created,
        shutdown_time=shutdown_time,
        lm_dir=lm_dir,
        owner=OWNER,
        session=session,
    )
    return lm_dir, prepared


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def owner_of(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_uid, info.st_gid


def read_dir(folder: Path) -> dict[str, str]:
    return {file.name: file.read_text() for file in sorted(folder.iterdir())}


class FakeSession(requests.Session):
    """Answers every GET with ``body`` and ``status``; records what it was asked."""

    def __init__(self, body: bytes, status: int = 200) -> None:
        super().__init__()
        self.body = body
        self.status = status
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def get(self, url: str | bytes, **kwargs: Any) -> requests.Response:
        self.calls.append((str(url), kwargs))
        reply = requests.Response()
        reply.status_code = self.status
        reply.url = str(url)
        reply.raw = io.BytesIO(self.body)
        return reply


# --- names --------------------------------------------------------------------------------------


def test_lm_name() -> None:
    assert lm_name("vac01.example.com", 3) == "vac01-03.example.com"
    assert lm_name("vac01.example.com", 0) == "vac01-00.example.com"
    assert lm_name("vac01.example.com", 42) == "vac01-42.example.com"
    assert lm_name("vac01.example.com", 123) == "vac01-123.example.com"
    assert lm_name("vac01.a.example.com", 7) == "vac01-07.a.example.com"
    assert lm_name("vac01", 3) == "vac01-03"


def test_new_identity_has_a_fresh_uuid4() -> None:
    first, second = new_identity(LM, "vo"), new_identity(LM, "vo")
    assert (first.name, first.machinetype) == (LM, "vo")
    assert uuid.UUID(first.uuid).version == 4
    assert first.uuid != second.uuid


# --- templating ---------------------------------------------------------------------------------


@pytest.mark.parametrize("style", list(MjfEnvStyle))
@pytest.mark.parametrize("backend", list(LOCATIONS))
def test_every_fixed_pattern(tmp_path: Path, backend: str, style: MjfEnvStyle) -> None:
    config = load(
        tmp_path,
        {"gocdb_sitename": "UKI-TEST-SITE"},
        {"backend": backend, "image": "vo.img", "mjf_env_style": style.value},
    )
    lm = identity()
    locations = expected_locations(backend, style)
    if locations is None:
        with pytest.raises(PayloadError, match="serves no metadata over HTTP"):
            template_values(config, config.machinetypes["vo"], lm, PLACEMENTS[backend],
                            user_data_url=None, proxy_pem=None)  # fmt: skip
        return
    values = template_values(
        config,
        config.machinetypes["vo"],
        lm,
        PLACEMENTS[backend],
        user_data_url=None,
        proxy_pem=None,
    )
    machinefeatures, jobfeatures, joboutputs = locations
    expected = {
        "url": "",  # a file, not fetched
        "space": SPACE,
        "machinetype": "vo",
        "vmtype": "vo",
        "machine_hostname": LM,
        "vm_hostname": LM,
        "manager_version": f"lmrunner {__version__}",
        "vmlm_version": f"lmrunner {__version__}",
        "manager_hostname": HOST,
        "vmlm_hostname": HOST,
        "machinefeatures_url": machinefeatures,
        "jobfeatures_url": jobfeatures,
        "joboutputs_url": joboutputs,
        "root_image_url": "",
        "uuid": lm.uuid,
        "site": "UKI-TEST-SITE",
    }
    assert set(expected) == set(FIXED_PATTERNS)
    assert values.values == {f"user_data_{k}": v for k, v in expected.items()}
    assert values.secrets == frozenset()

    template = "".join(f"{name}=##user_data_{name}##\n" for name in FIXED_PATTERNS)
    rendered = render_user_data(template, values.values)
    assert rendered == "".join(f"{name}={expected[name]}\n" for name in FIXED_PATTERNS)


def test_mjf_locations_per_placement_and_style() -> None:
    for backend, (mf, jf, jo) in LOCATIONS.items():
        placement = PLACEMENTS[backend]
        assert placement.user_data == PurePosixPath("/user_data")
        assert placement.cvmfs == PurePosixPath("/cvmfs")
        assert mjf_locations(placement, MjfEnvStyle.PATH) == {
            "MACHINEFEATURES": mf,
            "JOBFEATURES": jf,
            "JOBOUTPUTS": jo,
        }
        assert mjf_locations(placement, MjfEnvStyle.FILE_URL) == {
            "MACHINEFEATURES": f"file://{mf}",
            "JOBFEATURES": f"file://{jf}",
            "JOBOUTPUTS": f"file://{jo}",
        }


@pytest.mark.parametrize(
    ("image", "url"),
    [
        ("https://images.example.com/vo.iso", "https://images.example.com/vo.iso"),
        ("http://images.example.com/vo.iso", "http://images.example.com/vo.iso"),
        ("docker://registry.example.com/vo:1", ""),
        ("/cvmfs/unpacked.cern.ch/vo", ""),
        ("vo.qcow2", ""),
    ],
)
def test_root_image_url_only_for_web_images(tmp_path: Path, image: str, url: str) -> None:
    config = load(tmp_path, {"allow_http": True}, vo={"backend": "vm", "image": image})
    values = template_values(
        config,
        config.machinetypes["vo"],
        identity(),
        PLACEMENTS["vm"],
        user_data_url=None,
        proxy_pem=None,
    )
    assert values.values["user_data_root_image_url"] == url


def test_site_is_empty_without_gocdb_sitename(tmp_path: Path) -> None:
    config = load(tmp_path)
    values = template_values(
        config,
        config.machinetypes["vo"],
        identity(),
        PLACEMENTS["docker"],
        user_data_url=None,
        proxy_pem=None,
    )
    assert values.values["user_data_site"] == ""


def _options_config(tmp_path: Path, vo: Mapping[str, Any] | None = None) -> Config:
    files_dir(tmp_path, {"hostcert.pem": "CERT\n", "hostkey.pem": "KEY\n", "greeting.txt": "hi\n"})
    (tmp_path / "motd.txt").write_text("message of the day")
    return load(
        tmp_path,
        {
            "user_data_options": {
                "colour": "red",
                "shared": "factory",
                "api_token": "s3cret",
                "greeting": "plain",
            },
            "user_data_files": {"hostcert": "hostcert.pem", "motd": str(tmp_path / "motd.txt")},
        },
        {
            "user_data_options": {"shared": "machinetype", "size": "large"},
            "user_data_files": {"hostkey": "hostkey.pem", "greeting": "greeting.txt"},
            **(vo or {}),
        },
        check_files=True,
    )


def test_options_and_files(tmp_path: Path) -> None:
    config = _options_config(tmp_path)
    values = template_values(
        config,
        config.machinetypes["vo"],
        identity(),
        PLACEMENTS["docker"],
        user_data_url=None,
        proxy_pem=None,
    )
    options = {
        k: v
        for k, v in values.values.items()
        if k.startswith(("user_data_option_", "user_data_file_"))
    }
    assert options == {
        "user_data_option_colour": "red",  # the factory's default
        "user_data_option_shared": "machinetype",  # the machinetype's overrides it
        "user_data_option_api_token": "s3cret",
        "user_data_option_size": "large",
        # Files (relative names in the machinetype's files/, absolute as they are), both spellings
        "user_data_option_hostcert": "CERT\n",
        "user_data_file_hostcert": "CERT\n",
        "user_data_option_motd": "message of the day",
        "user_data_file_motd": "message of the day",
        "user_data_option_hostkey": "KEY\n",
        "user_data_file_hostkey": "KEY\n",
        "user_data_option_greeting": "hi\n",  # a machinetype's file beats the factory's option
        "user_data_file_greeting": "hi\n",
    }
    assert values.secrets == {
        "user_data_option_api_token",
        "user_data_option_hostcert",
        "user_data_file_hostcert",
        "user_data_option_motd",
        "user_data_file_motd",
        "user_data_option_hostkey",
        "user_data_file_hostkey",
        "user_data_option_greeting",
        "user_data_file_greeting",
    }


def test_missing_user_data_file_names_key_and_path(tmp_path: Path) -> None:
    files_dir(tmp_path)
    config = load(tmp_path, vo={"user_data_files": {"hostcert": "hostcert.pem"}})
    missing = tmp_path / "state" / "machinetypes" / "vo" / "files" / "hostcert.pem"
    with pytest.raises(PayloadError) as caught:
        template_values(
            config,
            config.machinetypes["vo"],
            identity(),
            PLACEMENTS["docker"],
            user_data_url=None,
            proxy_pem=None,
        )
    assert str(caught.value) == (
        f"machinetypes.vo.user_data_files: cannot read {missing}: No such file or directory"
    )


def test_x509_proxy_pattern(tmp_path: Path) -> None:
    config = load(tmp_path)
    pem = "-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n"
    values = template_values(
        config,
        config.machinetypes["vo"],
        identity(),
        PLACEMENTS["docker"],
        user_data_url=None,
        proxy_pem=pem,
    )
    assert values.values["user_data_option_x509_proxy"] == pem
    assert values.secrets == {"user_data_option_x509_proxy"}
    assert render_user_data("P=##user_data_option_x509_proxy##", values.values) == f"P={pem}"


def test_leftover_patterns_are_removed() -> None:
    values = {"user_data_space": SPACE}
    template = (
        "a##user_data_whatever##b|##user_data_option_unset##|##user_data_file_unset##|"
        "##user_data_heartbeat_machines_url##|##user_data_option_x509_proxy##|##user_data_a,b##|"
        "##user_data_space##|##other##|##USER_DATA_SPACE##|#user_data_space#|##user_data_A##"
    )
    assert render_user_data(template, values) == (
        f"ab||||||{SPACE}|##other##|##USER_DATA_SPACE##|#user_data_space#|##user_data_A##"
    )


def test_values_are_inserted_literally() -> None:
    values = {"user_data_option_x": r"$HOME \1 \n 'q' \"dq\" & <b>"}
    text = render_user_data("x=##user_data_option_x## ##user_data_option_x##", values)
    assert text == r"x=$HOME \1 \n 'q' \"dq\" & <b> $HOME \1 \n 'q' \"dq\" & <b>"


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("password", True),
        ("db_pass", True),
        ("client_secret", True),
        ("api_token", True),
        ("ssh_key", True),
        ("credentials", True),
        ("proxy_url", True),
        ("colour", False),
        ("site_name", False),
        ("queue", False),
    ],
)
def test_options_named_like_secrets_are_secrets(tmp_path: Path, name: str, secret: bool) -> None:
    config = load(tmp_path, vo={"user_data_options": {name: "value"}})
    values = template_values(
        config,
        config.machinetypes["vo"],
        identity(),
        PLACEMENTS["docker"],
        user_data_url=None,
        proxy_pem=None,
    )
    assert (f"user_data_option_{name}" in values.secrets) is secret


def test_masked_hides_proxy_files_and_secret_options(tmp_path: Path) -> None:
    config = _options_config(tmp_path)
    values = template_values(
        config,
        config.machinetypes["vo"],
        identity(),
        PLACEMENTS["docker"],
        user_data_url=None,
        proxy_pem="PROXY-PEM-TEXT",
    )
    masked = values.masked()
    assert set(masked) == set(values.values)

    def hidden(key: str, size: int) -> str:
        return f"<secret {key}: {size} bytes, shown with --show-secrets>"

    assert masked["user_data_option_x509_proxy"] == hidden("user_data_option_x509_proxy", 14)
    assert masked["user_data_option_api_token"] == hidden("user_data_option_api_token", 6)
    assert masked["user_data_option_hostkey"] == hidden("user_data_option_hostkey", 4)
    assert masked["user_data_file_hostkey"] == hidden("user_data_file_hostkey", 4)
    assert masked["user_data_option_motd"] == hidden("user_data_option_motd", 18)
    shown = "\n".join(masked.values())
    for secret in ("PROXY-PEM-TEXT", "s3cret", "KEY\n", "CERT\n", "message of the day"):
        assert secret not in shown
    assert masked["user_data_option_colour"] == "red"
    assert masked["user_data_option_size"] == "large"
    assert masked["user_data_space"] == SPACE
    assert masked["user_data_machine_hostname"] == LM


def test_masked_of_plain_values() -> None:
    values = TemplateValues({"user_data_a": "1", "user_data_b": "22"}, frozenset({"user_data_b"}))
    assert values.masked() == {
        "user_data_a": "1",
        "user_data_b": "<secret user_data_b: 2 bytes, shown with --show-secrets>",
    }


# --- machine/job features -----------------------------------------------------------------------


def test_machine_and_job_features(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {
            "mb_per_processor": 3000,
            "swap_mb_per_processor": 500,
            "hs06_per_processor": 12.5,
            "disk_gb_per_processor": 20,
            "machinefeatures_options": {"vo_site": "UKI-TEST", "cpu_model": "epyc"},
        },
        {"stop_grace_seconds": 90, "disk_gb_per_processor": 10},
    )
    mt = config.machinetypes["vo"]
    lm = identity()
    limits = limits_for(config, mt, 4)
    assert limits == Limits(
        processors=4,
        memory_bytes=3000 * 4 * MIB,
        swap_bytes=500 * 4 * MIB,
        disk_bytes=40 * 10**9,
        hs06=50.0,
        pids=4096 * 4,  # pids_per_processor's default
    )
    assert limits.memory_mib == 12000
    machine, job = features(config, mt, lm, limits, created=CREATED, shutdown_time=SHUTDOWN)
    assert machine == {
        "total_cpu": "4",
        "hs06": "50",
        "shutdowntime": str(SHUTDOWN),
        "grace_secs": "90",
        "phys_cores": "4",
        "log_cores": "4",
        "jobslots": "1",
        "vo_site": "UKI-TEST",
        "cpu_model": "epyc",
    }
    assert job == {
        "allocated_cpu": "4\n",
        "allocated_CPU": "4\n",
        "hs06_job": "50",
        "shutdowntime_job": str(SHUTDOWN),
        "grace_secs_job": "90",
        "jobstart_secs": str(CREATED),
        "job_id": lm.uuid,
        "wall_limit_secs": "7200",
        "wall_limit_secs_lrms": "7200",
        "cpu_limit_secs": "28800",
        "cpu_limit_secs_lrms": "28800",
        "cpufactor_lrms": "1.0",
        "max_rss_bytes": str(3000 * 4 * 1048576),  # 12582912000
        "mem_limit_MB": "12582",  # decimal MB
        "max_swap_bytes": str(500 * 4 * 1048576),
        "scratch_limit_bytes": "40000000000",
    }


def test_defaults_without_hs06(tmp_path: Path) -> None:
    config = load(tmp_path)
    mt = config.machinetypes["vo"]
    machine, job = features(
        config, mt, identity(), limits_for(config, mt, 1), created=CREATED, shutdown_time=CREATED
    )
    assert "hs06" not in machine
    assert "hs06_job" not in job
    assert machine["grace_secs"] == job["grace_secs_job"] == "60"
    assert job["max_rss_bytes"] == str(2048 * 1048576)
    assert job["mem_limit_MB"] == "2147"
    assert job["max_swap_bytes"] == "0"
    assert job["scratch_limit_bytes"] == str(40 * 10**9)
    assert job["wall_limit_secs"] == job["cpu_limit_secs"] == "0"


def test_fractional_hs06(tmp_path: Path) -> None:
    config = load(tmp_path, {"hs06_per_processor": 10.5})
    mt = config.machinetypes["vo"]
    machine, job = features(
        config, mt, identity(), limits_for(config, mt, 3), created=CREATED, shutdown_time=SHUTDOWN
    )
    assert machine["hs06"] == job["hs06_job"] == "31.50"


@pytest.mark.parametrize(
    ("factory_gb", "mt_gb", "processors", "expected"),
    [
        (20, 10, 4, 40_000_000_000),  # the machinetype's value, at most the factory's: used
        (20, 20, 4, 80_000_000_000),
        (20, 30, 4, 80_000_000_000),  # more than the factory's: the factory's
        (20, None, 4, 80_000_000_000),
        (20, 0, 4, 0),
        (0.7, None, 3, 2_100_000_000),  # exact: no float truncation to 2099999999
        (40, 0.1, 3, 300_000_000),
    ],
)
def test_scratch_limit_bytes(
    tmp_path: Path, factory_gb: float, mt_gb: float | None, processors: int, expected: int
) -> None:
    vo = {} if mt_gb is None else {"disk_gb_per_processor": mt_gb}
    config = load(tmp_path, {"disk_gb_per_processor": factory_gb}, vo)
    mt = config.machinetypes["vo"]
    limits = limits_for(config, mt, processors)
    assert limits.disk_bytes == expected
    _, job = features(config, mt, identity(), limits, created=CREATED, shutdown_time=SHUTDOWN)
    assert job["scratch_limit_bytes"] == str(expected)


def test_standard_machinefeatures_key_in_options_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "lmrunner.yaml"
    path.write_text(
        f"factory:\n  space: {SPACE}\n  state_dir: {tmp_path}\n  machinefeatures_options:\n"
        "    hs06: '5'\n    total_cpu: '1'\n    extra: x\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path, hostname=HOST, cpus=8)
    assert caught.value.errors == (
        f"{path}:4: factory.machinefeatures_options: expected extra keys only; hs06, total_cpu "
        "is a standard machinefeatures key",
    )


def test_update_shutdowntime_rewrites_atomically(tmp_path: Path) -> None:
    lm_dir, _ = run_prepare(load(tmp_path))
    files = (
        lm_dir / "machinefeatures" / "shutdowntime",
        lm_dir / "jobfeatures" / "shutdowntime_job",
    )
    folders = {f.parent: f.parent.stat().st_ino for f in files}
    inodes = [f.stat().st_ino for f in files]
    assert [f.read_text() for f in files] == [str(SHUTDOWN)] * 2

    assert update_shutdowntime(lm_dir, SHUTDOWN - 100) is True
    assert [f.read_text() for f in files] == [str(SHUTDOWN - 100)] * 2
    assert all(f.stat().st_ino != inode for f, inode in zip(files, inodes, strict=True))
    # Containers bind the folders: they must stay the same objects.
    assert {folder: folder.stat().st_ino for folder in folders} == folders
    assert all(mode(f) == 0o644 for f in files)
    assert sorted(p.name for p in files[0].parent.iterdir() if p.name.startswith(".")) == []

    inodes = [f.stat().st_ino for f in files]
    for later in (SHUTDOWN - 100, SHUTDOWN, SHUTDOWN + 3600):
        assert update_shutdowntime(lm_dir, later) is False
    assert [f.read_text() for f in files] == [str(SHUTDOWN - 100)] * 2
    assert [f.stat().st_ino for f in files] == inodes


def test_update_shutdowntime_repairs_an_unreadable_file(tmp_path: Path) -> None:
    lm_dir, _ = run_prepare(load(tmp_path))
    (lm_dir / "jobfeatures" / "shutdowntime_job").write_text("garbage")
    assert update_shutdowntime(lm_dir, SHUTDOWN + 10) is True
    assert (lm_dir / "machinefeatures" / "shutdowntime").read_text() == str(SHUTDOWN)
    assert (lm_dir / "jobfeatures" / "shutdowntime_job").read_text() == str(SHUTDOWN + 10)


# --- prepare --------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", list(MjfEnvStyle))
@pytest.mark.parametrize("backend", list(LOCATIONS))
def test_prepare_layout_mounts_and_env(tmp_path: Path, backend: str, style: MjfEnvStyle) -> None:
    files_dir(
        tmp_path, {"vo.user_data": "#!/bin/sh\necho ##user_data_space## ##user_data_uuid##\n"}
    )
    config = load(
        tmp_path,
        {"mb_per_processor": 1000},
        {
            "backend": backend,
            "user_data": "vo.user_data",
            "mjf_env_style": style.value,
            "stop_grace_seconds": 30,
        },
        check_files=True,
    )
    lm = identity()
    locations = expected_locations(backend, style)
    if locations is None:
        with pytest.raises(PayloadError, match="serves no metadata over HTTP"):
            run_prepare(config, lm, processors=3)
        return
    lm_dir, prepared = run_prepare(config, lm, processors=3)
    assert sorted(p.name for p in lm_dir.iterdir()) == [
        "jobfeatures",
        "joboutputs",
        "machinefeatures",
        "user_data",
    ]
    assert prepared.directory == lm_dir
    assert mode(lm_dir) == 0o755

    user_data = lm_dir / "user_data"
    assert user_data.read_text() == f"#!/bin/sh\necho {SPACE} {lm.uuid}\n"
    assert mode(user_data) == 0o755  # the default container_command runs it
    assert owner_of(user_data) == (os.getuid(), os.getgid())

    for folder in ("machinefeatures", "jobfeatures"):
        assert mode(lm_dir / folder) == 0o755
        assert owner_of(lm_dir / folder) == (os.getuid(), os.getgid())
        assert all(mode(f) == 0o644 for f in (lm_dir / folder).iterdir())
    mt = config.machinetypes["vo"]
    machine, job = features(
        config, mt, lm, prepared.limits, created=CREATED, shutdown_time=SHUTDOWN
    )
    assert read_dir(lm_dir / "machinefeatures") == machine
    assert read_dir(lm_dir / "jobfeatures") == job
    assert job["job_id"] == lm.uuid
    assert job["allocated_cpu"] == "3\n"
    assert job["max_rss_bytes"] == str(3000 * MIB)
    assert machine["grace_secs"] == "30"

    joboutputs = lm_dir / "joboutputs"
    assert list(joboutputs.iterdir()) == []
    assert mode(joboutputs) == 0o755
    assert owner_of(joboutputs) == OWNER

    mf, jf, jo = LOCATIONS[backend]
    assert prepared.mounts == (
        Mount(user_data, PurePosixPath("/user_data"), read_only=True),
        Mount(lm_dir / "machinefeatures", PurePosixPath(mf), read_only=True),
        Mount(lm_dir / "jobfeatures", PurePosixPath(jf), read_only=True),
        Mount(joboutputs, PurePosixPath(jo), read_only=False),
    )
    assert prepared.env == dict(zip(("MACHINEFEATURES", "JOBFEATURES", "JOBOUTPUTS"), locations,
                                    strict=True))  # fmt: skip
    assert prepared.limits == limits_for(config, mt, 3)
    assert prepared.shutdown_time == SHUTDOWN


def test_prepare_uuid_is_the_job_id_and_in_user_data(tmp_path: Path) -> None:
    files_dir(tmp_path, {"ud": "uuid=##user_data_uuid##"})
    config = load(tmp_path, vo={"user_data": "ud"})
    lm = identity()
    lm_dir, _ = run_prepare(config, lm)
    assert (lm_dir / "user_data").read_text() == f"uuid={lm.uuid}"
    assert (lm_dir / "jobfeatures" / "job_id").read_text() == lm.uuid


def test_prepare_cvmfs_and_tmp_binds(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        vo={
            "backend": "apptainer",
            "cvmfs_repositories": ["vo.cern.ch"],
            "tmp_binds": ["/scratch", "/var/tmp/work"],
        },
    )
    lm_dir, prepared = run_prepare(config)
    mnt = lm_dir / "mnt"
    assert prepared.mounts[4:] == (
        Mount(Path("/cvmfs"), PurePosixPath("/cvmfs"), read_only=True),
        Mount(mnt / "tmp0", PurePosixPath("/scratch"), read_only=False),
        Mount(mnt / "tmp1", PurePosixPath("/var/tmp/work"), read_only=False),
    )
    assert sorted(p.name for p in mnt.iterdir()) == ["tmp0", "tmp1"]
    for folder in mnt.iterdir():
        assert list(folder.iterdir()) == []
        assert owner_of(folder) == OWNER
        assert mode(folder) == 0o755
    assert owner_of(mnt) == (os.getuid(), os.getgid())


def test_prepare_without_cvmfs_or_tmp_binds_has_neither(tmp_path: Path) -> None:
    lm_dir, prepared = run_prepare(load(tmp_path))
    assert len(prepared.mounts) == 4
    assert not any(m.target == PurePosixPath("/cvmfs") for m in prepared.mounts)
    assert not (lm_dir / "mnt").exists()


def test_prepare_without_user_data_writes_an_empty_file(tmp_path: Path) -> None:
    lm_dir, _ = run_prepare(load(tmp_path))
    assert (lm_dir / "user_data").read_text() == ""
    assert mode(lm_dir / "user_data") == 0o755


@pytest.mark.parametrize(
    ("template", "secret"),
    [
        ("token=##user_data_option_api_token##", True),
        ("cert=##user_data_option_hostcert##", True),
        ("cert=##user_data_file_hostcert##", True),  # deprecated spelling
        ("space=##user_data_space## colour=##user_data_option_colour##", False),
        ("empty=##user_data_option_empty_key##", False),  # a secret name, but nothing in it
    ],
)
def test_prepare_user_data_with_secrets_is_the_lms_alone(
    tmp_path: Path, template: str, secret: bool
) -> None:
    files_dir(tmp_path, {"ud": template, "hostcert.pem": "CERT"})
    config = load(
        tmp_path,
        vo={
            "user_data": "ud",
            "user_data_options": {"api_token": "s3cret", "colour": "red", "empty_key": ""},
            "user_data_files": {"hostcert": "hostcert.pem"},
        },
    )
    lm_dir, _ = run_prepare(config)
    user_data = lm_dir / "user_data"
    if secret:
        assert (mode(user_data), owner_of(user_data)) == (0o700, OWNER)
    else:
        assert (mode(user_data), owner_of(user_data)) == (0o755, (os.getuid(), os.getgid()))
    assert "##" not in user_data.read_text()


def test_prepare_renders_options_and_files(tmp_path: Path) -> None:
    template = (
        "##user_data_option_colour##|##user_data_option_shared##|##user_data_option_size##|"
        "##user_data_option_hostcert##|##user_data_file_hostkey##|##user_data_option_motd##|"
        "##user_data_option_greeting##|##user_data_option_nothing##|##user_data_whatever##"
    )
    files_dir(tmp_path, {"vo.user_data": template})
    lm_dir, _ = run_prepare(_options_config(tmp_path, {"user_data": "vo.user_data"}))
    assert (lm_dir / "user_data").read_text() == (
        "red|machinetype|large|CERT\n|KEY\n|message of the day|hi\n||"
    )


def test_prepare_refuses_an_existing_directory(tmp_path: Path) -> None:
    config = load(tmp_path)
    lm_dir = config.factory.state_dir / "machines" / LM
    lm_dir.mkdir(parents=True)
    (lm_dir / "old").write_text("kept")
    with pytest.raises(FileExistsError):
        run_prepare(config)
    assert [p.name for p in lm_dir.iterdir()] == ["old"]


def test_prepare_missing_user_data_file(tmp_path: Path) -> None:
    files_dir(tmp_path)
    config = load(tmp_path, vo={"user_data": "vo.user_data"})
    path = tmp_path / "state" / "machinetypes" / "vo" / "files" / "vo.user_data"
    with pytest.raises(PayloadError) as caught:
        run_prepare(config)
    assert str(caught.value) == (
        f"machinetypes.vo.user_data: cannot read {path}: No such file or directory"
    )
    # Nothing half-made stays behind: the same LM can be prepared again once the file exists.
    assert not (config.factory.state_dir / "machines" / LM).exists()


def test_prepare_absolute_user_data_path(tmp_path: Path) -> None:
    template = tmp_path / "elsewhere.user_data"
    template.write_text("##user_data_machinetype##/##user_data_url##.")
    lm_dir, _ = run_prepare(load(tmp_path, vo={"user_data": str(template)}))
    assert (lm_dir / "user_data").read_text() == "vo/."


def test_prepare_fetches_https_user_data(tmp_path: Path) -> None:
    url = "https://vo.example.com/vo.user_data"
    session = FakeSession(b"from=##user_data_url## host=##user_data_machine_hostname##")
    lm_dir, _ = run_prepare(load(tmp_path, vo={"user_data": url}), session=session)
    assert (lm_dir / "user_data").read_text() == f"from={url} host={LM}"
    assert len(session.calls) == 1
    called, kwargs = session.calls[0]
    assert called == url
    assert kwargs["stream"] is True
    assert kwargs["timeout"] == 30.0
    assert kwargs["headers"]["User-Agent"] == f"lmrunner/{__version__}"


def test_prepare_https_user_data_failure(tmp_path: Path) -> None:
    url = "https://vo.example.com/vo.user_data"
    with pytest.raises(PayloadError) as caught:
        run_prepare(load(tmp_path, vo={"user_data": url}), session=FakeSession(b"", status=404))
    message = str(caught.value)
    assert message.startswith(f"machinetypes.vo.user_data: {url}: HTTPError: 404 Client Error")
    assert "\n" not in message


def test_prepare_https_user_data_too_large(tmp_path: Path) -> None:
    url = "https://vo.example.com/vo.user_data"
    session = FakeSession(b"x" * (4 * MIB + 1))
    with pytest.raises(PayloadError) as caught:
        run_prepare(load(tmp_path, vo={"user_data": url}), session=session)
    assert str(caught.value) == (f"machinetypes.vo.user_data: {url}: larger than {4 * MIB} bytes")


# --- the proxy, made by openssl -----------------------------------------------------------------


def _openssl(*args: str | Path) -> str:
    return runner.run(["openssl", *args]).stdout


def _make_user_cert(folder: Path) -> None:
    """A throw-away CA and a user certificate (2 days) as x509cert.pem/x509key.pem."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_pem = folder / "ca.key", folder / "ca.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-noenc", "-keyout", ca_key, "-out", ca_pem,
             "-subj", "/C=UK/O=Test Grid/CN=Test CA", "-days", "3")  # fmt: skip
    _openssl("req", "-new", "-newkey", "rsa:2048", "-noenc", "-keyout", folder / "x509key.pem",
             "-out", folder / "user.csr", "-subj", "/C=UK/O=Test Grid/CN=Test User")  # fmt: skip
    _openssl("x509", "-req", "-in", folder / "user.csr", "-CA", ca_pem, "-CAkey", ca_key,
             "-set_serial", "2", "-days", "2", "-out", folder / "x509cert.pem")  # fmt: skip


@pytest.mark.allow_subprocess
@pytest.mark.parametrize("in_template", [True, False])
def test_prepare_with_a_real_proxy(tmp_path: Path, in_template: bool) -> None:
    _make_user_cert(tmp_path / "state" / "machinetypes" / "vo")
    template = "proxy:\n##user_data_option_x509_proxy##" if in_template else "no proxy here"
    files_dir(tmp_path, {"ud": template})
    config = load(tmp_path, vo={"user_data": "ud", "user_data_proxy": True}, check_files=True)
    now = int(time.time())
    shutdown = now + 3600
    lm_dir, _ = run_prepare(config, created=now, shutdown_time=shutdown)
    user_data = lm_dir / "user_data"
    assert (mode(user_data), owner_of(user_data)) == (0o700, OWNER)
    text = user_data.read_text()
    if not in_template:
        assert text == "no proxy here"
        return
    pem = text.removeprefix("proxy:\n")
    assert pem.count("-----BEGIN CERTIFICATE-----") == 2  # the proxy, then the user's cert
    assert pem.count("-----BEGIN PRIVATE KEY-----") == 1
    assert proxy_not_after(pem) == shutdown
    proxy_file = tmp_path / "proxy.pem"
    proxy_file.write_text(pem)
    subject = _openssl("x509", "-in", proxy_file, "-noout", "-nameopt", "RFC2253", "-subject")
    assert subject == "subject=CN=vo,CN=Test User,O=Test Grid,C=UK\n"
    user_cert = (tmp_path / "state" / "machinetypes" / "vo" / "x509cert.pem").read_text()
    assert pem.endswith(user_cert)
