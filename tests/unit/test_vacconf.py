"""Converting a Vac site's INI configuration to lmrunner YAML (lmrunner.vacconf)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from lmrunner.config import BackendName, Config, effective_disk_gb
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
    assert factory["version_logger"] == 1  # carried over, with a warning: lmrunner sends none
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
    assert "ignored by Vac" in line("mb_per_machine")
    assert "[targetshares] lhcb: section rejected by Vac too" in line("lhcb")
    assert "writes this key itself" in line("machinefeatures_option_hs06")
    assert len(site.dropped) == 7
    assert all(d in site.yaml_text for d in site.dropped)  # also listed in the header


def test_unsupported_options_are_carried_over_with_a_warning(site: Conversion) -> None:
    settings = DATA / "vac.d/10-settings.conf"
    assert site.warnings == (
        f"{settings}: [settings] version_logger: not supported by lmrunner: it sends nothing to "
        "the GridPP version logger",
        f"{DATA / 'vac.d/20-lhcb.conf'}: [machinetype lhcb-vm] cernvm_signing_dn: not supported "
        "by lmrunner: it checks no CernVM image signature (pin a remote image with image_digest)",
    )
    # root_device = vda and scratch_device = vdb ([vmtype lhcb-raw]) are what lmrunner does.
    header, body = site.yaml_text.split("\nfactory:")
    assert all(f"#   {w}" in header for w in site.warnings)
    # ... and beside each value, so whoever edits the YAML sees it too.
    assert (
        "  # not supported by lmrunner: it sends nothing to the GridPP version logger\n  "
        "version_logger:" in body
    )
    assert "vacmon_hostport:" in body and "sends no VacMon" not in body  # lmrunner sends it


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
        "[machinetype cms]\nroot_image = cms.iso\n"
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
    assert "allow_http" not in doc["factory"]  # the pipe's own switch covers its document
    assert "idle" not in doc["machinetypes"]
    assert result.dropped == (
        f"{path}: [machinetype idle] root_image: missing; lmrunner requires it, machinetype "
        "not converted",
    )
    assert result.warnings == (
        f"{path}: [vacuum_pipe vo] vacuum_pipe_url: http:// URL kept with "
        "vacuum_pipes.vo.allow_http: true; fetched without TLS (as Vac did), so anyone on the "
        "path can change what LMs run",
    )
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


# --- Vac's defaults, old names and http:// ------------------------------------------------


def _convert(tmp_path: Path, text: str) -> tuple[Path, Conversion, dict[str, Any]]:
    path = _write(tmp_path, "vac.conf", "[settings]\nvac_space = vac.example.com\n" + text)
    result = convert_vac_conf([path])
    return path, result, yaml.safe_load(result.yaml_text)


def _loads(tmp_path: Path, result: Conversion) -> Config:
    path = _write(tmp_path, "lmrunner.yaml", result.yaml_text)
    return load_config(path, hostname="vac01.example.com", cpus=4, check_files=False)


HTTP = "fetched without TLS (as Vac did), so anyone on the path can change what LMs run"


def test_http_urls_are_kept_with_allow_http(tmp_path: Path) -> None:
    path, result, doc = _convert(
        tmp_path,
        "[machinetype cms]\nroot_image = http://example.com/cms.iso\n"
        "user_data = http://example.com/cms.ud\n"
        "[vacuum_pipe vo]\nvacuum_pipe_url = https://vo.example.com/vo.pipe\n"
        "user_data = http://vo.example.com/vo.ud\n",
    )
    assert doc["factory"]["allow_http"] is True
    assert doc["machinetypes"]["cms"]["image"] == "http://example.com/cms.iso"
    assert doc["machinetypes"]["cms"]["user_data"] == "http://example.com/cms.ud"
    assert doc["vacuum_pipes"]["vo"]["overrides"]["user_data"] == "http://vo.example.com/vo.ud"
    assert "allow_http" not in doc["vacuum_pipes"]["vo"]  # its document comes over https
    assert result.dropped == ()
    assert result.warnings == (
        f"{path}: [vacuum_pipe vo] user_data: http:// URL kept with factory.allow_http: true; "
        f"{HTTP}",
        f"{path}: [machinetype cms] root_image: http:// URL kept with factory.allow_http: true; "
        f"{HTTP}",
        f"{path}: [machinetype cms] user_data: http:// URL kept with factory.allow_http: true; "
        f"{HTTP}",
    )
    # The YAML says why allow_http is on, and for which options.
    assert (
        "  # Vac fetched these http:// URLs; lmrunner needs allow_http for them:\n"
        "  #   [vacuum_pipe vo] user_data\n"
        "  #   [machinetype cms] root_image\n"
        "  #   [machinetype cms] user_data\n"
        "  allow_http: true\n"
    ) in result.yaml_text


def test_https_urls_need_no_allow_http(tmp_path: Path) -> None:
    _path, result, doc = _convert(
        tmp_path,
        "[machinetype cms]\nroot_image = https://e.org/c.iso\nuser_data = https://e.org/u\n",
    )
    assert "allow_http" not in doc["factory"]
    assert result.warnings == ()
    _loads(tmp_path, result)


@pytest.mark.parametrize("option", ["disk_gb_per_processor", "scratch_gb", "disk_gb_per_cpu"])
def test_disk_size_zero_in_settings_means_the_default(tmp_path: Path, option: str) -> None:
    path, result, doc = _convert(tmp_path, f"{option} = 0\n")
    assert "disk_gb_per_processor" not in doc["factory"]
    assert result.warnings == (
        f"{path}: [settings] {option}: 0 meant the default size in Vac (a share of the volume "
        "group, or 40 GB per processor for a VM's disk file), not no disk; left unset: "
        "lmrunner's default (40 GB per processor) applies",
    )
    assert _loads(tmp_path, result).factory.disk_gb_per_processor == 40.0


def test_disk_size_zero_in_a_machinetype_means_the_factorys(tmp_path: Path) -> None:
    path, result, doc = _convert(
        tmp_path,
        "disk_gb_per_processor = 25\n"
        "[machinetype cms]\nroot_image = cms.iso\ndisk_gb_per_processor = 0.0\n"
        "[vacuum_pipe vo]\nvacuum_pipe_url = https://vo.example.com/vo.pipe\n"
        "disk_gb_per_processor = 0\n",
    )
    assert doc["factory"]["disk_gb_per_processor"] == 25.0
    assert "disk_gb_per_processor" not in doc["machinetypes"]["cms"]
    assert "disk_gb_per_processor" not in doc["vacuum_pipes"]["vo"]["overrides"]
    then = "left unset: the factory's disk_gb_per_processor applies"
    assert [w.split(": 0 meant")[0] for w in result.warnings] == [
        f"{path}: [vacuum_pipe vo] disk_gb_per_processor",
        f"{path}: [machinetype cms] disk_gb_per_processor",
    ]
    assert all(w.endswith(then) for w in result.warnings)
    config = _loads(tmp_path, result)
    assert config.machinetypes["cms"].disk_gb_per_processor is None
    assert effective_disk_gb(config.machinetypes["cms"], config.factory) == 25.0


@pytest.mark.parametrize(
    ("section", "option", "value", "key", "expected"),
    [
        # Every deprecated spelling vac.md lists (2.2, 2.3), mapped through the schema.
        ("settings", "cpu_total", "3", "total_processors", 3),
        ("settings", "vcpu_per_machine", "2", "processors_per_superslot", 2),
        ("settings", "cpu_per_machine", "2", "processors_per_superslot", 2),
        ("settings", "mb_per_cpu", "4096", "mb_per_processor", 4096),
        ("settings", "hs06_per_cpu", "10.5", "hs06_per_processor", 10.5),
        ("settings", "scratch_gb", "30", "disk_gb_per_processor", 30.0),
        ("settings", "disk_gb_per_cpu", "30", "disk_gb_per_processor", 30.0),
        ("settings", "overload_per_cpu", "1.5", "overload_per_processor", 1.5),
        ("machinetype cms", "vm_model", "vm-raw", "backend", "vm"),
        ("machinetype cms", "machineoutputs_days", "2", "machines_dir_days", 2.0),
        ("vmtype cms", "max_processors", "2", "max_processors", 2),  # [vmtype NAME]
    ],
)
def test_every_deprecated_spelling_vac_lists(
    tmp_path: Path, section: str, option: str, value: str, key: str, expected: Any
) -> None:
    text = f"[{section}]\n{option} = {value}\n"
    if section != "settings":
        text = text.replace("\n", "\nroot_image = cms.iso\n", 1)
    else:
        text = text.removeprefix("[settings]\n")
    _path, result, doc = _convert(tmp_path, text)
    values = doc["factory"] if section == "settings" else doc["machinetypes"]["cms"]
    assert values[key] == expected
    assert result.dropped == result.warnings == ()
    _loads(tmp_path, result)


def test_cernvm_signing_dn_is_image_signing_dn_and_warned_about(tmp_path: Path) -> None:
    path, result, doc = _convert(
        tmp_path, "[machinetype cms]\nroot_image = cms.iso\ncernvm_signing_dn = /CN=cvm\n"
    )
    assert doc["machinetypes"]["cms"]["image_signing_dn"] == "/CN=cvm"
    assert result.warnings == (
        f"{path}: [machinetype cms] cernvm_signing_dn: not supported by lmrunner: it checks no "
        "CernVM image signature (pin a remote image with image_digest)",
    )


def test_rootpublickey_in_settings_is_root_public_key(tmp_path: Path) -> None:
    path, result, doc = _convert(tmp_path, "rootpublickey = /etc/vac/key.pub\n")
    assert doc["factory"]["root_public_key"] == "/etc/vac/key.pub"
    assert result.warnings == (
        f"{path}: [settings] rootpublickey: old Vac name, carried over as root_public_key",
    )
    assert _loads(tmp_path, result).factory.root_public_key == Path("/etc/vac/key.pub")
    # The current name wins, as for every other deprecated spelling.
    path, result, doc = _convert(
        tmp_path, "rootpublickey = /etc/old.pub\nroot_public_key = /etc/new.pub\n"
    )
    assert doc["factory"]["root_public_key"] == "/etc/new.pub"
    assert result.dropped == (f"{path}: [settings] rootpublickey: overridden by root_public_key",)


def test_machinetype_only_options_vac_ignored_are_reported(tmp_path: Path) -> None:
    path, result, doc = _convert(
        tmp_path,
        "[machinetype cms]\nroot_image = cms.iso\nrootpublickey = /root/a.pub\n"
        "root_public_key = /root/b.pub\nlog_machineoutputs = true\n",
    )
    assert "root_public_key" not in doc["factory"]
    key = "(it asked for root_public_key in [settings]); lmrunner offers factory.root_public_key"
    assert result.dropped == (
        f"{path}: [machinetype cms] rootpublickey: ignored by Vac 03 in a machinetype section "
        f"{key} to every VM",
        f"{path}: [machinetype cms] root_public_key: ignored by Vac 03 in a machinetype section "
        f"{key} to every VM",
        f"{path}: [machinetype cms] log_machineoutputs: obsolete, ignored by Vac too; "
        "machines_dir_days sets how long an LM's directory (joboutputs included) is kept",
    )


def test_old_proxy_options_become_x509_cert_and_key(tmp_path: Path) -> None:
    path, result, doc = _convert(
        tmp_path,
        "[machinetype cms]\nroot_image = cms.iso\nuser_data_proxy_cert = cert.pem\n"
        "user_data_proxy_key = /etc/grid-security/key.pem\n",
    )
    cms = doc["machinetypes"]["cms"]
    # Old Vac looked relative names up in the machinetype's folder, not in files/.
    assert cms["x509_cert"] == f"{FILES}/cms/cert.pem"
    assert cms["x509_key"] == "/etc/grid-security/key.pem"
    assert "user_data_proxy" not in cms
    tail = "Vac 03 ignored it, and lmrunner uses it only with user_data_proxy: true"
    assert result.warnings == (
        f"{path}: [machinetype cms] user_data_proxy_cert: old Vac name, carried over as "
        f"x509_cert; {tail}",
        f"{path}: [machinetype cms] user_data_proxy_key: old Vac name, carried over as "
        f"x509_key; {tail}",
    )
    assert _loads(tmp_path, result).machinetypes["cms"].x509_cert == Path(f"{FILES}/cms/cert.pem")


def test_old_proxy_options_give_way_to_user_data_proxy(tmp_path: Path) -> None:
    # Vac 03 ignored them: user_data_proxy made the proxy from x509cert.pem and x509key.pem.
    path, result, doc = _convert(
        tmp_path,
        "[machinetype cms]\nroot_image = cms.iso\nuser_data_proxy = true\n"
        "user_data_proxy_cert = cert.pem\n"
        "[vacuum_pipe vo]\nvacuum_pipe_url = https://vo.example.com/vo.pipe\n"
        "user_data_proxy_key = key.pem\n",
    )
    assert doc["machinetypes"]["cms"]["x509_cert"] == f"{FILES}/cms/x509cert.pem"
    assert doc["vacuum_pipes"]["vo"]["overrides"]["x509_key"] == f"{FILES}/vo/x509key.pem"
    assert result.dropped == (
        f"{path}: [vacuum_pipe vo] user_data_proxy_key: ignored by Vac 03, which made the proxy "
        f"from x509cert.pem and x509key.pem in {FILES}/vo (as this conversion does)",
        f"{path}: [machinetype cms] user_data_proxy_cert: ignored by Vac 03, which made the "
        f"proxy from x509cert.pem and x509key.pem in {FILES}/cms (as this conversion does)",
    )
    assert result.warnings == ()


def test_an_empty_old_proxy_name_is_an_error(tmp_path: Path) -> None:
    # An empty value is no path: one error naming file, section and option, as for others.
    path = _write(
        tmp_path,
        "vac.conf",
        "[settings]\nvac_space = vac.example.com\n"
        "[machinetype cms]\nroot_image = cms.iso\nuser_data_proxy_cert =\n",
    )
    with pytest.raises(ConfigError) as caught:
        convert_vac_conf([path])
    assert caught.value.errors == (
        f"{path}: [machinetype cms] user_data_proxy_cert: expected an absolute path, got ''",
    )


@pytest.mark.parametrize(
    ("value", "carried"), [("2", 2), ("true", 1), ("TRUE", 1), ("false", 0), ("0", 0)]
)
def test_version_logger_takes_vacs_old_true_and_false(
    tmp_path: Path, value: str, carried: int
) -> None:
    path, result, doc = _convert(tmp_path, f"version_logger = {value}\n")
    assert doc["factory"]["version_logger"] == carried
    warned = (
        f"{path}: [settings] version_logger: not supported by lmrunner: it sends nothing to the "
        "GridPP version logger",
    )
    assert result.warnings == (warned if carried else ())


def test_version_logger_that_is_no_number_was_0_for_vac(tmp_path: Path) -> None:
    path, result, doc = _convert(tmp_path, "version_logger = daily\n")
    assert "version_logger" not in doc["factory"]
    assert result.dropped == (
        f"{path}: [settings] version_logger: not an integer, which Vac took as 0 (the default "
        "here)",
    )


def test_unsupported_options_at_their_default_are_no_news(tmp_path: Path) -> None:
    _path, result, doc = _convert(
        tmp_path,
        "udp_timeout_seconds = 10\nversion_logger = 0\n"
        "[machinetype cms]\nroot_image = cms.qcow2\nroot_device = vda\nscratch_device = vdb\n",
    )
    assert doc["factory"]["udp_timeout_seconds"] == 10.0
    assert doc["machinetypes"]["cms"]["root_device"] == "vda"
    assert result.warnings == result.dropped == ()


def test_every_unsupported_option_is_warned_about(tmp_path: Path) -> None:
    path, result, _doc = _convert(
        tmp_path,
        "factories = . vac02.example.com\nudp_timeout_seconds = 4\n"
        "vacmon_hostport = vacmon.example.com:8884\nversion_logger = 3\n"
        "gocdb_cert_file = /etc/c.pem\ngocdb_key_file = /etc/k.pem\n"
        "[machinetype cms]\nroot_image = cms.qcow2\nroot_device = sda\nscratch_device = sdb\n"
        "image_signing_dn = /CN=x\n",
    )
    named = [w.removeprefix(f"{path}: ").split(": not supported")[0] for w in result.warnings]
    assert named == [
        "[settings] version_logger",
        "[settings] gocdb_cert_file",
        "[settings] gocdb_key_file",
        "[machinetype cms] root_device",
        "[machinetype cms] scratch_device",
        "[machinetype cms] image_signing_dn",
    ]
    assert all(": not supported by lmrunner: " in w for w in result.warnings)
    # Carried over all the same: the YAML still says what the site configured.
    config = _loads(tmp_path, result)
    assert config.factory.vacmon_hostport == ("vacmon.example.com:8884",)
    assert config.machinetypes["cms"].root_device == "sda"
