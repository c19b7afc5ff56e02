"""The configuration subcommands: check, user-data, import-vac-conf, config-reference."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from lmrunner import loader as config_mod
from lmrunner.backends.base import Backend, MachineSpec
from lmrunner.backends.fake import FakeBackend
from lmrunner.cli import main
from lmrunner.cli.check import validation_lines
from lmrunner.cli.reference import render
from lmrunner.errors import BackendUnavailable, SpecError
from lmrunner.images import DownloadSettings, ImageCache
from lmrunner.loader import load_config
from tests.unit.test_images import ImageServer, Resource

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
        "| `version_logger` | integer | 0 |  | `version_logger` | factory_status messages per "
        "day to the GridPP version logger (Vac sent one a day by default). **Not supported by "
        "lmrunner: it sends nothing to the GridPP version logger.** |"
    ) in text
    accepted = text.split("## Vac options accepted but not supported")[1].split("\n## ")[0]
    rows = [row.split(" | ")[0] for row in accepted.splitlines() if row.startswith("| `")]
    assert rows == [
        "| `factory.gocdb_cert_file`",
        "| `factory.gocdb_key_file`",
        "| `factory.version_logger`",
        "| `machinetypes.NAME.root_device`",
        "| `machinetypes.NAME.scratch_device`",
        "| `machinetypes.NAME.image_signing_dn`",
    ]
    # Old spellings the importer maps by hand are listed with the option they become.
    assert "| `root_public_key`, `rootpublickey` |" in text
    assert "| `user_data_proxy_cert` |" in text
    assert "| `log_machineoutputs` | obsolete" in text


# --- check: each machinetype validated by its backend ---------------------------------------------


class Recording(FakeBackend):
    """The fake backend, remembering what validate was given (and raising ``fault``)."""

    def __init__(self, tmp_path: Path, fault: Exception | None = None) -> None:
        super().__init__(tmp_path / "fake-engine")
        self.fault = fault
        self.validated: dict[str, MachineSpec] = {}

    def validate(self, spec: MachineSpec) -> None:
        self.validated[spec.machinetype] = spec
        if self.fault is not None:
            raise self.fault


def _site(tmp_path: Path, machinetypes: str, factory: str = "") -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(
        f"factory:\n  space: space.example.com\n  state_dir: {tmp_path / 'state'}\n{factory}"
        f"machinetypes:\n{machinetypes}"
    )
    return path


def _fake_type(name: str, image: str, extra: str = "") -> str:
    return f"  {name}:\n    backend: fake\n    image: '{image}'\n    target_share: 1\n{extra}"


def _validate(path: Path, backends: Mapping[str, Backend]) -> tuple[list[str], list[str]]:
    return validation_lines(load_config(path), backends)


def test_validation_of_a_good_machinetype_says_nothing(tmp_path: Path) -> None:
    backend = Recording(tmp_path)
    path = _site(tmp_path, _fake_type("alpha", "fake:seconds=5"))
    assert _validate(path, {"fake": backend}) == ([], [])
    spec = backend.validated["alpha"]
    assert spec.image == "fake:seconds=5"
    assert not spec.directory.is_relative_to(tmp_path / "state")  # built in a scratch folder
    assert not spec.directory.exists()  # and that is gone


def test_validation_turns_a_spec_error_into_an_error_naming_the_machinetype(
    tmp_path: Path,
) -> None:
    path = _site(tmp_path, _fake_type("alpha", "fake:") + _fake_type("broken", "fake:bogus=1"))
    errors, warnings = _validate(path, {"fake": FakeBackend(tmp_path / "fake-engine")})
    assert errors == ["machinetypes.broken: fake: unknown key 'bogus' in image 'fake:bogus=1'"]
    assert warnings == []


def test_validation_reports_a_backends_own_spec_error(tmp_path: Path) -> None:
    backend = Recording(tmp_path, SpecError("memory_gb: 3 is not enough for this engine"))
    path = _site(tmp_path, _fake_type("alpha", "fake:"))
    errors, warnings = _validate(path, {"fake": backend})
    assert errors == ["machinetypes.alpha: memory_gb: 3 is not enough for this engine"]
    assert warnings == []


def test_validation_warns_about_what_it_cannot_check(tmp_path: Path) -> None:
    backend = Recording(tmp_path, BackendUnavailable("fake", "engine down"))
    path = _site(tmp_path, _fake_type("alpha", "fake:"))
    errors, warnings = _validate(path, {"fake": backend})
    assert errors == []
    assert warnings == ["machinetypes.alpha: not validated: fake: engine down"]


def test_validation_warns_about_a_backend_missing_here(tmp_path: Path) -> None:
    path = _site(tmp_path, _fake_type("alpha", "fake:"))
    assert _validate(path, {}) == (
        [],
        ["machinetypes.alpha: backend fake is not usable here: not validated"],
    )


def test_validation_of_a_remote_image_not_downloaded_is_a_warning(tmp_path: Path) -> None:
    backend = Recording(tmp_path)
    url = "https://images.example.com/vo/cernvm4.iso"
    path = _site(tmp_path, _fake_type("remote", url) + _fake_type("local", "fake:"))
    errors, warnings = _validate(path, {"fake": backend})
    assert errors == []
    assert warnings == [
        f"machinetypes.remote.image: {url} is not downloaded yet: the fake backend checks it "
        "once the daemon has it"
    ]
    assert set(backend.validated) == {"local"}  # nothing to validate the remote one with


def test_validation_uses_the_daemons_downloaded_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                 "ALL_PROXY"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setattr("socket.getfqdn", lambda name="": "vac01.example.com")  # HTTPServer's
    server = ImageServer()
    server.resources["/cernvm4.iso"] = Resource()
    try:
        path = _site(tmp_path, _fake_type("remote", server.url()), "  allow_http: true\n")
        config = load_config(path)
        daemons = ImageCache(tmp_path / "state" / "images", DownloadSettings.of(config.factory))
        copy = daemons.wait(server.url(), 10).path
        daemons.close()
        assert copy is not None
        backend = Recording(tmp_path)
        assert _validate(path, {"fake": backend}) == ([], [])
        assert backend.validated["remote"].image == str(copy)  # the copy, not the URL
        # The real fake backend refuses any image but its scripts: an error, as a start would.
        errors, _ = _validate(path, {"fake": FakeBackend(tmp_path / "fake-engine")})
        assert errors == [f"machinetypes.remote: fake: image '{copy}' must start with 'fake:'"]
        assert server.count() == 1  # check downloads nothing itself
    finally:
        server.stop()


def test_validation_leaves_the_real_state_dir_alone(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    before = sorted(state.rglob("*"))
    backend = Recording(tmp_path)
    path = _site(tmp_path, _fake_type("alpha", "fake:", "    user_data_options: {a: b}\n"))
    assert _validate(path, {"fake": backend}) == ([], [])
    assert backend.validated["alpha"].directory.parent.name == "machines"  # in the scratch one
    assert not (state / "machines").exists()
    assert [p for p in sorted(state.rglob("*")) if p.name != "images"] == before
    assert list(tmp_path.glob("**/machines")) == []


def test_validation_creates_no_state_dir_that_was_not_there(tmp_path: Path) -> None:
    """``lmrunner check`` before the daemon ever ran (or as another account): it must not make
    the state directory (the scratch one is elsewhere)."""
    path = _site(tmp_path, _fake_type("alpha", "fake:"))
    assert _validate(path, {"fake": Recording(tmp_path)}) == ([], [])
    assert not (tmp_path / "state").exists(), sorted((tmp_path / "state").rglob("*"))


def test_check_fails_on_a_spec_error_of_a_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _site(tmp_path, _fake_type("broken", "fake:bogus=1"))
    assert main(["check", "--config", str(path), "--no-probe"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "lmrunner: error: machinetypes.broken: fake: unknown key 'bogus' in image 'fake:bogus=1'\n"
    )
    # --skip-file-checks skips the validation too.
    assert main(["check", "--config", str(path), "--no-probe", "--skip-file-checks", "-q"]) == 0
