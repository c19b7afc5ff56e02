"""Converting a Vac site's INI configuration to lmrunner YAML (lmrunner.vacconf)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from lmrunner.config import BackendName
from lmrunner.errors import ConfigError
from lmrunner.loader import load_config
from lmrunner.vacconf import Conversion, convert_vac_conf, default_vac_files

DATA = Path(__file__).parents[1] / "data" / "vac"
FILES = "/var/lib/vac/machinetypes"


@pytest.fixture(scope="module")
def site() -> Conversion:
    return convert_vac_conf(default_vac_files(DATA))


@pytest.fixture(scope="module")
def doc(site: Conversion) -> dict[str, Any]:
    data = yaml.safe_load(site.yaml_text)
    assert isinstance(data, dict)
    return data


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_default_files_follow_vacs_order(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc / "vac.d").mkdir(parents=True)
    (tmp_path / "var/run").mkdir(parents=True)
    for name in ("vac.d/20-b.conf", "vac.d/10-a.conf", "vac.d/notes.txt", "vac.conf"):
        (etc / name).write_text("")
    assert default_vac_files(etc) == [
        etc / "vac.d/10-a.conf",
        etc / "vac.d/20-b.conf",
        etc / "vac.conf",
    ]
    (tmp_path / "var/run/vac.conf").write_text("")
    assert default_vac_files(etc)[-1] == tmp_path / "var/run/vac.conf"


def test_site_conversion_passes_load_config(site: Conversion, tmp_path: Path) -> None:
    path = _write(tmp_path, "lmrunner.yaml", site.yaml_text)
    config = load_config(path, hostname="vac01.example.com", cpus=64, check_files=False)
    assert config.factory.space == "vac.example.com"
    assert config.factory.state_dir == Path("/var/lib/lmrunner")
    assert set(config.machinetypes) == {"lhcb-vm", "lhcb-docker", "lhcb-sc", "lhcb-raw", "atlas"}
    assert config.machinetypes["lhcb-sc"].backend is BackendName.APPTAINER
    assert config.pipes["gridpp"].overrides["backoff_seconds"] == 1800
    # The local override of the pipe's type waits for the pipe's document.
    assert any("gridpp-lz" in warning for warning in config.warnings)
    assert site.yaml_text.startswith("# lmrunner configuration converted from Vac's")
    assert str(DATA / "vac.conf") in site.yaml_text.split("\nfactory:")[0]


def test_relative_vac_files_become_absolute_paths(doc: dict[str, Any]) -> None:
    mts = doc["machinetypes"]
    assert mts["lhcb-vm"]["user_data_files"] == {
        "hostcert": f"{FILES}/lhcb-vm/files/hostcert.pem",
        "hostkey": "/etc/grid-security/vac/hostkey.pem",
    }
    assert mts["lhcb-vm"]["user_data"].startswith("https://")
    assert mts["lhcb-vm"]["x509_cert"] == f"{FILES}/lhcb-vm/x509cert.pem"
    assert mts["lhcb-vm"]["x509_key"] == f"{FILES}/lhcb-vm/x509key.pem"
    assert mts["lhcb-docker"]["user_data"] == f"{FILES}/lhcb-docker/files/lhcb-docker.user_data"
    assert mts["lhcb-docker"]["image"].startswith("docker://")
    assert mts["lhcb-sc"]["image"] == "/cvmfs/cernvm-prod.cern.ch/cvm4"
    assert mts["lhcb-raw"]["image"] == f"{FILES}/lhcb-raw/files/lhcb-cc7.qcow2"
    assert "x509_cert" not in mts["lhcb-docker"]
    # A pipe's types kept their files under the pipe's prefix.
    assert mts["gridpp-lz"]["user_data_files"] == {
        "hostcert": f"{FILES}/gridpp/files/lz-hostcert.pem"
    }
    assert doc["vacuum_pipes"]["gridpp"]["overrides"]["x509_cert"] == f"{FILES}/gridpp/x509cert.pem"


def test_values_names_models_and_order(doc: dict[str, Any]) -> None:
    factory, mts = doc["factory"], doc["machinetypes"]
    # Deprecated names, typed values, lists and booleans.
    assert factory["total_processors"] == 32
    assert factory["mb_per_processor"] == 3072
    assert factory["hs06_per_processor"] == 11.5
    assert factory["shutdown_time"] == 1893456000
    assert factory["draining"] is False
    assert factory["sc_user"] == "vacsc"
    assert factory["factories"] == ["vac01.example.com", "vac02.example.com"]
    assert factory["vacmon_hostport"] == ["vacmon.gridpp.ac.uk:8884", "vacmon.example.com:8884"]
    assert factory["user_data_options"] == {"cvmfs_proxy": "http://squid.example.com:3128"}
    assert factory["machinefeatures_options"] == {"foo": "bar"}
    assert "version_logger" not in factory
    # vac.conf is read after vac.d/: its value wins.
    assert factory["overload_per_processor"] == 2.0
    assert mts["lhcb-vm"]["machines_dir_days"] == 1.5
    assert mts["lhcb-vm"]["image_signing_dn"].startswith("/DC=ch/DC=cern")
    assert mts["lhcb-vm"]["user_data_proxy"] is True
    assert mts["lhcb-sc"]["legacy_proxy"] is False
    assert mts["lhcb-docker"]["tmp_binds"] == ["/tmp", "/var/tmp", "/scratch"]
    assert mts["lhcb-docker"]["cvmfs_repositories"][0] == "lhcb.cern.ch"
    assert mts["lhcb-vm"]["target_share"] == 4.0
    backends = {name: mt.get("backend") for name, mt in mts.items()}
    assert backends == {
        "lhcb-vm": "vm",  # cernvm3
        "lhcb-docker": "docker",
        "lhcb-sc": "apptainer",  # singularity
        "lhcb-raw": "vm",  # [vmtype] with vm_model = vm-raw
        "atlas": "vm",  # no machine_model: Vac's default cernvm3
        "gridpp-lz": None,  # overrides a pipe type: the pipe decides
    }
    pipe = doc["vacuum_pipes"]["gridpp"]
    assert pipe["url"] == "https://repo.gridpp.ac.uk/vacproject/gridpp/gridpp.pipe"
    assert pipe["target_share"] == 3.0
    assert pipe["overrides"]["backoff_seconds"] == 1800
    assert pipe["overrides"]["user_data_options"] == {
        "cvmfs_proxy": "http://squid2.example.com:3128"
    }


def test_dropped_options_name_file_and_reason(site: Conversion) -> None:
    def line(option: str) -> str:
        found = [d for d in site.dropped if f"] {option}: " in d]
        assert len(found) == 1, site.dropped
        return found[0]

    settings = str(DATA / "vac.d/10-settings.conf")
    assert line("volume_group").startswith(f"{settings}: [settings] volume_group: ")
    assert "LVM" in line("volume_group")
    assert "user-mode networking" in line("fix_networking")
    assert line("max_wallclock_secs").endswith(
        "20-lhcb.conf: [machinetype lhcb-docker] max_wallclock_secs: unknown to Vac and lmrunner"
    )
    assert "[vmtype lhcb-raw] domain_type: rejected by Vac too" in line("domain_type")
    assert "opt-in" in line("version_logger")
    assert "ignored by Vac" in line("mb_per_machine")
    assert "[targetshares] lhcb: section rejected by Vac too" in line("lhcb")
    assert "writes this key itself" in line("machinefeatures_option_hs06")
    assert len(site.dropped) == 8
    assert all(d in site.yaml_text for d in site.dropped)  # also listed in the header


def test_current_name_beats_deprecated_one_in_any_file(tmp_path: Path) -> None:
    first = _write(
        tmp_path, "a.conf", "[settings]\nvac_space = vac.example.com\nmb_per_processor = 4096\n"
    )
    second = _write(tmp_path, "b.conf", "[settings]\nmb_per_cpu = 1024\n")
    result = convert_vac_conf([first, second])
    assert yaml.safe_load(result.yaml_text)["factory"]["mb_per_processor"] == 4096
    assert result.dropped == (f"{second}: [settings] mb_per_cpu: overridden by mb_per_processor",)


def test_missing_file_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        convert_vac_conf([tmp_path / "vac.conf"])
    assert caught.value.errors == (f"{tmp_path / 'vac.conf'}: no such file",)


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("[settings]\nvac_space = vac.example.com\nthis is not ini\n", 3, "cannot parse"),
        ("vac_space = vac.example.com\n[settings]\n", 1, "outside any [section]"),
    ],
)
def test_malformed_ini_names_file_and_line(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    path = _write(tmp_path, "vac.conf", text)
    with pytest.raises(ConfigError) as caught:
        convert_vac_conf([path])
    (error,) = caught.value.errors
    assert error.startswith(f"{path}:{line}: ") and words in error
    assert "\n" not in error


def test_values_vac_rejects_are_errors(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "vac.conf",
        "[settings]\nvac_space = vac.example.com\ncpu_total = many\n"
        "[machinetype x]\nmachine_model = cernvm9\nroot_image = x.iso\n",
    )
    with pytest.raises(ConfigError) as caught:
        convert_vac_conf([path])
    assert caught.value.errors == (
        f"{path}: [settings] cpu_total: expected an integer >= 0, got 'many'",
        f"{path}: [machinetype x] machine_model: expected one of "
        "docker, singularity, cernvm3, cernvm4, vm-raw",
    )
    with pytest.raises(ConfigError, match="vac_space: required"):
        convert_vac_conf([_write(tmp_path, "empty.conf", "[settings]\n")])


def test_settings_files_http_pipe_and_imageless_type(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "vac.conf",
        "[settings]\nvac_space = vac.example.com\nuser_data_file_ca = ca.pem\n"
        "[machinetype cms]\nroot_image = cms.iso\nuser_data = http://example.com/ud\n"
        "[machinetype idle]\ntarget_share = 0\n"
        "[vacuum_pipe vo]\nvacuum_pipe_url = http://vo.example.com/vo.pipe\n",
    )
    result = convert_vac_conf([path])
    doc = yaml.safe_load(result.yaml_text)
    # Vac looked a relative [settings] file up in each machinetype's own files/.
    assert "user_data_files" not in doc["factory"]
    cms = doc["machinetypes"]["cms"]
    assert cms["user_data_files"] == {"ca": f"{FILES}/cms/files/ca.pem"}
    assert doc["vacuum_pipes"]["vo"]["overrides"]["user_data_files"] == {
        "ca": f"{FILES}/vo/files/ca.pem"
    }
    assert doc["vacuum_pipes"]["vo"]["allow_http"] is True
    assert "user_data" not in cms
    assert "idle" not in doc["machinetypes"]
    assert [d.split("] ")[1].split(":")[0] for d in result.dropped] == ["user_data", "root_image"]
    config = _write(tmp_path, "lmrunner.yaml", result.yaml_text)
    load_config(config, hostname="vac01.example.com", cpus=4, check_files=False)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"[settings]\nvac_space = caf\xe9\n", "{f}: not UTF-8 text (byte 26)"),
        ("[settings]\n".encode("utf-16"), "{f}: not UTF-8 text (byte 0)"),
        (b"[settings]\nvac_space = a\x00b\n", "{f}: not text: NUL character (byte 24)"),
        (b"\x1f\x8b\x08\x00binary", "{f}: not UTF-8 text (byte 1)"),  # gzip
    ],
)
def test_files_that_are_not_text(tmp_path: Path, data: bytes, error: str) -> None:
    path = tmp_path / "vac.conf"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as caught:
        convert_vac_conf([path])
    assert caught.value.errors == (error.format(f=path),)


def test_a_folder_is_no_file_and_a_bom_is_fine(tmp_path: Path) -> None:
    (tmp_path / "vac.d").mkdir()
    with pytest.raises(ConfigError) as caught:
        convert_vac_conf([tmp_path / "vac.d"])
    assert caught.value.errors == (f"{tmp_path / 'vac.d'}: cannot read: Is a directory",)
    path = tmp_path / "vac.conf"
    path.write_bytes(b"\xef\xbb\xbf[settings]\nvac_space = vac.example.com\n")  # Notepad's
    assert yaml.safe_load(convert_vac_conf([path]).yaml_text)["factory"]["space"] == (
        "vac.example.com"
    )


def test_odd_names_stay_on_one_line_and_out_of_the_yaml(tmp_path: Path) -> None:
    # configparser splits lines at \n only: \x85 and \u2028 stay in names, yet YAML and
    # str.splitlines() break lines there.
    path = _write(
        tmp_path,
        "vac.conf",
        "[settings]\nvac_space = vac.example.com\nodd\x85name = 1\n[odd\u2028section]\nx = 1\n",
    )
    result = convert_vac_conf([path])
    assert result.dropped == (
        f"{path}: [settings] odd\\x85name: unknown to Vac and lmrunner",
        f"{path}: [odd\\u2028section] x: section unknown to Vac and lmrunner",
    )
    assert yaml.safe_load(result.yaml_text)["factory"]["space"] == "vac.example.com"
    path.write_text("[settings]\nvac_space = vac.example.com\n[machinetype a\x0bb]\nx = 1\n")
    with pytest.raises(ConfigError) as caught:
        convert_vac_conf([path])
    assert caught.value.errors == (f"{path}: [machinetype a\\x0bb]: expected [a-z0-9-]",)
