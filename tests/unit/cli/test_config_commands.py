"""The configuration subcommands: check, user-data, import-vac-conf, config-reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmrunner import loader as config_mod
from lmrunner.cli import main
from lmrunner.cli.reference import render

REPO = Path(__file__).resolve().parents[3]
VAC_DATA = REPO / "tests" / "data" / "vac"


@pytest.fixture(autouse=True)
def _this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    # The checks compare with the host's FQDN and CPU count; pin both for repeatable tests.
    monkeypatch.setattr("socket.getfqdn", lambda: "vac01.example.com")
    monkeypatch.setattr(config_mod, "usable_cpus", lambda: 64)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    user_data = tmp_path / "user_data"
    user_data.write_text(
        "#!/bin/sh\n# ##user_data_machinetype## on ##user_data_manager_hostname##\n"
        "PROXY='##user_data_option_squid##' TOKEN='##user_data_option_api_token##'\n"
        "##user_data_unknown##\n"
    )
    path = tmp_path / "lmrunner.yaml"
    path.write_text(
        f"factory:\n  space: space.example.com\n  state_dir: {tmp_path / 'state'}\n"
        "machinetypes:\n"
        f"  lhcb-dc:\n    backend: docker\n    image: docker://vcbusybox\n"
        f"    user_data: {user_data}\n"
        "    user_data_options: {squid: 'http://squid:3128', api_token: s3cr3t}\n"
    )
    return path


def test_check_prints_the_effective_configuration(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", "--config", str(site)]) == 0
    out = capsys.readouterr().out
    effective = yaml.safe_load(out)
    assert effective["factory"]["hostname"] == "vac01.example.com"
    assert effective["machinetypes"]["lhcb-dc"]["backoff_seconds"] == 10
    assert out.startswith(f"# effective configuration from {site}")


def test_check_reports_every_error_on_its_own_line(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site.write_text(site.read_text() + "    target_shar: 1\n    min_processors: -1\n")
    assert main(["check", "--config", str(site)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"lmrunner: {site}:10: machinetypes.lhcb-dc.target_shar: unknown key; "
        "did you mean 'target_share'?",
        f"lmrunner: {site}:11: machinetypes.lhcb-dc.min_processors: expected an integer >= 1, "
        "got -1",
    ]


def test_user_data_masks_secrets(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["user-data", "lhcb-dc", "--config", str(site)]) == 0
    out = capsys.readouterr().out
    assert "# lhcb-dc on vac01.example.com" in out
    assert "PROXY='http://squid:3128'" in out
    assert "s3cr3t" not in out
    assert "<secret user_data_option_api_token: 6 bytes, shown with --show-secrets>" in out
    assert "##" not in out


def test_user_data_shows_secrets_when_asked(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["user-data", "lhcb-dc", "--config", str(site), "--show-secrets"]) == 0
    assert "TOKEN='s3cr3t'" in capsys.readouterr().out


def test_user_data_of_unknown_machinetype(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["user-data", "atlas", "--config", str(site)]) == 1
    assert capsys.readouterr().err == "lmrunner: no machinetype 'atlas' (configured: lhcb-dc)\n"


def test_imported_vac_site_passes_check_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = [*sorted((VAC_DATA / "vac.d").glob("*.conf")), VAC_DATA / "vac.conf"]
    assert main(["import-vac-conf", *map(str, files)]) == 0
    converted = capsys.readouterr()
    assert "not carried over:" in converted.err
    path = tmp_path / "lmrunner.yaml"
    path.write_text(converted.out)
    # The site's files live under /var/lib/vac on the Vac host, not here.
    assert main(["check", "--config", str(path), "--skip-file-checks", "--quiet"]) == 0
    lines = converted.out.splitlines()

    def line(text: str, after: int = 0) -> int:
        return next(n for n, t in enumerate(lines, 1) if n > after and t.startswith(text))

    assert capsys.readouterr().err.splitlines() == [
        # The pipe has not been fetched here, so its local override waits for it.
        f"lmrunner: warning: {path}:{line('  gridpp-lz:')}: machinetypes.gridpp-lz: pipe "
        "'gridpp' offers no such machinetype (yet); section ignored",
        # What the import warned about, check says again: the options do nothing here.
        f"lmrunner: warning: {path}:{line('  factories:')}: factory.factories: not supported "
        "yet: lmrunner queries no other factory (VacQuery), so target shares count this "
        "factory's LMs only",
        f"lmrunner: warning: {path}:{line('  vacmon_hostport:')}: factory.vacmon_hostport: not "
        "supported by lmrunner: it sends no VacMon messages",
        f"lmrunner: warning: {path}:{line('  version_logger: 1')}: factory.version_logger: not "
        "supported by lmrunner: it sends nothing to the GridPP version logger",
        f"lmrunner: warning: {path}:{line('    image_signing_dn:', line('  lhcb-vm:'))}: "
        "machinetypes.lhcb-vm.image_signing_dn: not supported by lmrunner: it checks no CernVM "
        "image signature (pin a remote image with image_digest)",
    ]


def test_configuration_reference_is_up_to_date() -> None:
    written = (REPO / "docs" / "configuration.md").read_text()
    assert written == render(), "run: lmrunner config-reference > docs/configuration.md"


def test_reference_lists_every_vac_option_with_a_home() -> None:
    text = render()
    for vac_name in ("vac_space", "cpu_total", "singularity_user", "machineoutputs_days",
                     "cernvm_signing_dn", "vacuum_pipe_url", "volume_group"):  # fmt: skip
        assert f"`{vac_name}`" in text


def test_example_configuration_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    example = REPO / "examples" / "lmrunner.yaml"
    assert main(["check", "--config", str(example), "--skip-file-checks", "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_check_warns_about_widened_capabilities(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site.write_text(site.read_text() + "    capabilities: [SYS_ADMIN]\n")
    assert main(["check", "--config", str(site), "--quiet"]) == 0
    assert capsys.readouterr().err == (
        "lmrunner: warning: machinetypes.lhcb-dc.capabilities: LMs get SYS_ADMIN beyond "
        "lmrunner's reduced default set\n"
    )


@pytest.mark.parametrize(
    ("command", "name", "data", "error"),
    [
        ("check", "bad.yaml", b"factory:\n  space: \xff\n", "not UTF-8 text (byte 18)"),
        ("check", "bad.yaml", b"\x7fELF\x02\x01\x01\x00", "not text: NUL character (byte 7)"),
        ("check", "bad.yaml", b"a: " + b"[" * 5000, "invalid YAML: nested too deeply"),
        ("import-vac-conf", "bad.conf", b"[settings]\n\xfe\xff", "not UTF-8 text (byte 11)"),
        ("import-vac-conf", "bad.conf", b"[settings]\x00", "not text: NUL character (byte 10)"),
    ],
)
def test_files_that_are_not_text_give_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    name: str,
    data: bytes,
    error: str,
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    args = [command, "--config", str(path)] if command == "check" else [command, str(path)]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", f"lmrunner: {path}: {error}\n")


def test_check_keeps_odd_file_names_on_their_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "a\nb.yaml"
    path.write_text(f"factory:\n  space: space.example.com\n  state_dir: {tmp_path / 'state'}\n")
    assert main(["check", "--config", str(path), "--no-probe"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# effective configuration from {tmp_path}/a\\nb.yaml\n")
    assert yaml.safe_load(out)["factory"]["space"] == "space.example.com"
    path.write_text("factory: [\x0b]\n")
    assert main(["check", "--config", str(path)]) == 1
    assert capsys.readouterr().err == (
        f"lmrunner: {tmp_path}/a\\nb.yaml: invalid YAML: control character U+000B (byte 10)\n"
    )


def test_check_warns_about_every_unsupported_option_set(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site.write_text(
        site.read_text().replace(
            "factory:\n",
            "factory:\n  vacmon_hostport: [vacmon.example.com:8884]\n  udp_timeout_seconds: 10\n",
        )
        + "vacuum_pipes:\n  vo:\n    url: https://vo.example.com/vo.pipe\n"
        "    overrides: {image_signing_dn: /CN=x, root_device: vda}\n"
    )
    confd = site.parent / "conf.d"
    confd.mkdir()
    (confd / "50-devices.yaml").write_text("machinetypes:\n  lhcb-dc:\n    scratch_device: sdb\n")
    assert main(["check", "--config", str(site), "--quiet"]) == 0  # warnings only
    # udp_timeout_seconds and root_device hold their defaults: that is what lmrunner does.
    assert capsys.readouterr().err.splitlines() == [
        f"lmrunner: warning: {site}:2: factory.vacmon_hostport: not supported by lmrunner: it "
        "sends no VacMon messages",
        f"lmrunner: warning: {confd / '50-devices.yaml'}:3: machinetypes.lhcb-dc.scratch_device: "
        "not supported by lmrunner: the scratch disk is the next virtio disk (vdb after a disk "
        "image, vda after an ISO or kernel; /dev/disk/by-id/virtio-scratch)",
        f"lmrunner: warning: {site}:15: vacuum_pipes.vo.overrides.image_signing_dn: not "
        "supported by lmrunner: it checks no CernVM image signature (pin a remote image with "
        "image_digest)",
    ]


def test_check_names_the_pipe_an_unsupported_value_came_from(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmrunner.cli.check import unsupported_lines
    from lmrunner.loader import load_config

    site.write_text(site.read_text() + "vacuum_pipes:\n  vo:\n    url: https://vo.example.com/p\n")
    entry = {"suffix": "prod", "machine_model": "docker", "root_image": "docker://vcbusybox",
             "image_signing_dn": "/CN=cvm", "target_share": 1}  # fmt: skip
    config = load_config(site, pipe_documents={"vo": {"machinetypes": [entry]}})
    assert unsupported_lines(config) == [
        "vacuum pipe vo: machinetypes.vo-prod.image_signing_dn: not supported by lmrunner: it "
        "checks no CernVM image signature (pin a remote image with image_digest)"
    ]
    assert capsys.readouterr().err == ""


def test_import_vac_conf_prints_every_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "vac.conf"
    path.write_text(
        "[settings]\nvac_space = vac.example.com\nfactories = . vac02.example.com\n"
        "disk_gb_per_processor = 0\n"
        "[machinetype cms]\nroot_image = cms.iso\nuser_data = http://example.com/ud\n"
        "log_machineoutputs = true\n"
    )
    assert main(["import-vac-conf", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "  allow_http: true\n" in out
    assert err.splitlines() == [
        f"lmrunner: not carried over: {path}: [machinetype cms] log_machineoutputs: obsolete, "
        "ignored by Vac too; machines_dir_days sets how long an LM's directory (joboutputs "
        "included) is kept",
        f"lmrunner: warning: {path}: [settings] factories: not supported yet: lmrunner queries "
        "no other factory (VacQuery), so target shares count this factory's LMs only",
        f"lmrunner: warning: {path}: [settings] disk_gb_per_processor: 0 meant the default size "
        "in Vac (a share of the volume group, or 40 GB per processor for a VM's disk file), not "
        "no disk; left unset: lmrunner's default (40 GB per processor) applies",
        f"lmrunner: warning: {path}: [machinetype cms] user_data: http:// URL kept with "
        "factory.allow_http: true; fetched without TLS (as Vac did), so anyone on the path can "
        "change what LMs run",
    ]


def test_reference_marks_unsupported_options() -> None:
    text = render()
    assert (
        "| `vacmon_hostport` | list of text | [] |  | `vacmon_hostport` | VacMon receivers "
        "(host:port) Vac sent factory, machinetype and machine status to. **Not supported by "
        "lmrunner: it sends no VacMon messages.** |"
    ) in text
    assert "**Not supported yet: lmrunner sends no VacQuery requests.**" in text
    accepted = text.split("## Vac options accepted but not supported")[1].split("\n## ")[0]
    rows = [row.split(" | ")[0] for row in accepted.splitlines() if row.startswith("| `")]
    assert rows == [
        "| `factory.factories`",
        "| `factory.udp_timeout_seconds`",
        "| `factory.gocdb_cert_file`",
        "| `factory.gocdb_key_file`",
        "| `factory.vacmon_hostport`",
        "| `factory.version_logger`",
        "| `machinetypes.NAME.root_device`",
        "| `machinetypes.NAME.scratch_device`",
        "| `machinetypes.NAME.image_signing_dn`",
    ]
    # Old spellings the importer maps by hand are listed with the option they become.
    assert "| `root_public_key`, `rootpublickey` |" in text
    assert "| `user_data_proxy_cert` |" in text
    assert "| `log_machineoutputs` | obsolete" in text
