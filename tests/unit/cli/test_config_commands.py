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
    # The pipe has not been fetched here, so its local override waits for it.
    assert capsys.readouterr().err.splitlines() == [
        f"lmrunner: warning: {path}:104: machinetypes.gridpp-lz: pipe 'gridpp' offers no such "
        "machinetype (yet); section ignored"
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
