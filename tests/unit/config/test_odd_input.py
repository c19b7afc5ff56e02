"""Configuration files that are not what they should be: one line each, naming file and place."""

from __future__ import annotations

import codecs
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from lmrunner.config import Config
from lmrunner.errors import ConfigError
from lmrunner.loader import load_config
from lmrunner.yamlsrc import MAX_FILE_BYTES

GOOD = b"factory:\n  space: vac01.example.com\n  mb_per_processor: 1024\n"


def load(path: Path) -> Config:
    return load_config(path, hostname="factory01.example.com", cpus=8)


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert all(line.isprintable() for line in caught.value.errors)
    return caught.value.errors[0]


def write(tmp_path: Path, data: bytes, name: str = "lmrunner.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def alias_bomb(levels: int, width: int) -> bytes:
    lines = ["l0: &l0 [x]"]
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"factory:\n  space: caf\xe9\n", "{f}: not UTF-8 text (byte 21)"),
        (codecs.BOM_UTF8 + b"factory:\n  space: \xff\n", "{f}: not UTF-8 text (byte 21)"),
        ("factory: {}\n".encode("utf-16"), "{f}: not UTF-8 text (byte 0)"),
        (b"\x7fELF\x02\x01\x01\x00\x00", "{f}: not text: NUL character (byte 7)"),
        (b"factory:\n  space: a\x00b\n", "{f}: not text: NUL character (byte 19)"),
        (
            b"factory:\n  space: \xc3\xa9\x01\n",
            "{f}: invalid YAML: control character U+0001 (byte 20)",
        ),
        (
            codecs.BOM_UTF8 + b"factory:\n  space: \x1b[31m\n",
            "{f}: invalid YAML: control character U+001B (byte 21)",
        ),
        (b'factory:\n  space: "a\\0b"\n', "{f}:2: invalid YAML: a NUL character in a value"),
        (
            b'factory:\n  space: "\\ud800"\n',
            "{f}:2: invalid YAML: a lone surrogate (no Unicode) in a value",
        ),
        (
            b'factory:\n  space: "\\U0A010000"\n',
            "{f}:2: invalid YAML: chr() arg not in range(0x110000)",
        ),
        (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "{f}: invalid YAML: nested too deeply"),
        (b"a: " + b"[" * 40 + b"]" * 40 + b"\n", "{f}: nested deeper than 32 levels"),
        (alias_bomb(9, 9), "{f}: more than 1000000 values once its aliases are expanded"),
        (b"a: &a [*a]\n", "{f}:1: invalid YAML: found unconstructable recursive node"),
        (
            b"factory:\n  mb_per_processor: " + b"9" * 5000 + b"\n",
            "{f}:2: invalid YAML: an integer beyond 64 bits",
        ),
        (
            b"factory:\n  mb_per_processor: 0x" + b"f" * 17 + b"\n",
            "{f}:2: invalid YAML: an integer beyond 64 bits",
        ),
        (
            b"factory:\n  space: 2024-13-45\n",
            "{f}:2: invalid YAML: cannot read this timestamp: month must be in 1..12",
        ),
        (
            b"factory:\n  draining: !!bool maybe\n",
            "{f}:2: invalid YAML: cannot read this bool: 'maybe'",
        ),
        (
            b"factory:\n  space: !!int ''\n",
            "{f}:2: invalid YAML: cannot read this int: string index out of range",
        ),
        (
            b"factory: !!python/object/apply:os.system [touch /tmp/pwned]\n",
            "{f}:1: invalid YAML: could not determine a constructor for the tag "
            "'tag:yaml.org,2002:python/object/apply:os.system'",
        ),
        (b"[factory]\n", "{f}:1: (top level): expected a mapping of sections"),
        (
            b'factory:\n  "a\\nb": 1\n  space: vac01.example.com\n',
            "{f}:2: factory.a\\nb: unknown key (valid keys: docs/configuration.md or "
            "`lmrunner config-reference`)",
        ),
        (
            GOOD + b"  memory_high_ratio: .nan\n",
            "{f}:4: factory.memory_high_ratio: expected a number from 0.5 to 1, got nan",
        ),
        (
            GOOD + b"  overload_per_processor: 1e999\n",
            "{f}:4: factory.overload_per_processor: expected a number >= 0, got '1e999'",
        ),
        (
            GOOD + b"  hs06_per_processor: 1" + b"0" * 400 + b"\n",
            "{f}:4: invalid YAML: an integer beyond 64 bits",
        ),
        (
            GOOD + b"  shutdown_time: '\xc2\xb2'\n",
            "{f}:4: factory.shutdown_time: expected a Unix time or ISO 8601 time, got '²'",
        ),
        (
            GOOD
            + b"  description: '"
            + b"x" * 200
            + b"'\n  pids_per_processor: '"
            + b"9" * 30
            + b"'\n",
            "{f}:5: factory.pids_per_processor: expected an integer >= 0, got '" + "9" * 30 + "'",
        ),
    ],
)
def test_odd_main_file(tmp_path: Path, data: bytes, error: str) -> None:
    path = write(tmp_path, data)
    assert error_of(path) == error.format(f=path)


def test_odd_conf_d_file_is_named(tmp_path: Path) -> None:
    main = write(tmp_path, GOOD)
    extra = write(tmp_path, b"factory:\n  draining: \xff\n", "conf.d/x.yaml")
    assert error_of(main) == f"{extra}: not UTF-8 text (byte 21)"


def test_utf8_bom_and_empty_files_are_fine(tmp_path: Path) -> None:
    main = write(tmp_path, codecs.BOM_UTF8 + GOOD)
    write(tmp_path, b"", "conf.d/10-empty.yaml")
    write(tmp_path, codecs.BOM_UTF8, "conf.d/20-bom-only.yaml")
    write(tmp_path, b"# nothing yet\n", "conf.d/30-comment.yaml")
    assert load(main).factory.mb_per_processor == 1024


def test_a_folder_where_a_file_belongs(tmp_path: Path) -> None:
    (tmp_path / "lmrunner.yaml").mkdir()
    assert (
        error_of(tmp_path / "lmrunner.yaml")
        == f"{tmp_path / 'lmrunner.yaml'}: cannot read: Is a directory"
    )
    main = write(tmp_path / "site", GOOD)
    (tmp_path / "site" / "conf.d" / "x.yaml").mkdir(parents=True)
    assert (
        error_of(main) == f"{tmp_path / 'site' / 'conf.d' / 'x.yaml'}: cannot read: Is a directory"
    )


def test_missing_and_oversized_files(tmp_path: Path) -> None:
    assert error_of(tmp_path / "nothing.yaml") == f"{tmp_path / 'nothing.yaml'}: no such file"
    big = tmp_path / "big.yaml"
    with big.open("wb") as file:
        file.truncate(MAX_FILE_BYTES + 1)  # sparse: costs no disk
    assert error_of(big) == f"{big}: larger than {MAX_FILE_BYTES} bytes"


def test_unreadable_file_and_conf_d(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Faked: these tests run as root too, which reads whatever the mode says.
    main = write(tmp_path, GOOD)
    (tmp_path / "conf.d").mkdir()
    real_open, real_iterdir = Path.open, Path.iterdir

    def refuse(name: str) -> Any:
        def call(self: Path, *args: Any, **kwargs: Any) -> Any:
            if self.name == name:
                raise PermissionError(errno.EACCES, "Permission denied", str(self))
            return (real_open if name.endswith(".yaml") else real_iterdir)(self, *args, **kwargs)

        return call

    monkeypatch.setattr(Path, "open", refuse("lmrunner.yaml"))
    assert error_of(main) == f"{main}: cannot read: Permission denied"
    monkeypatch.setattr(Path, "open", real_open)
    monkeypatch.setattr(Path, "iterdir", refuse("conf.d"))
    assert error_of(main) == f"{tmp_path / 'conf.d'}: cannot read: Permission denied"


def test_file_names_that_are_not_text_stay_on_one_line(tmp_path: Path) -> None:
    main = write(tmp_path, GOOD)
    odd = tmp_path / "conf.d" / os.fsdecode(b"a\nb\xff.yaml")
    write(tmp_path, b"a: b: c\n", f"conf.d/{odd.name}")
    where = f"{tmp_path / 'conf.d'}/a\\nb\\udcff.yaml:1"
    assert error_of(main) == f"{where}: invalid YAML: mapping values are not allowed here"


@pytest.mark.parametrize("network", ["bridge:", "bridge:br 0", "tap0", "user "])
def test_vm_network_is_checked_once_by_the_schema(tmp_path: Path, network: str) -> None:
    """Backends get their typed options (VmOptions) and never check this again."""
    config = tmp_path / "lmrunner.yaml"
    config.write_text(
        "factory:\n  space: s.example.com\n  hostname: h.example.com\n"
        f"  state_dir: {tmp_path / 'state'}\n"
        "machinetypes:\n  v:\n    backend: vm\n    image: /vmlinuz\n"
        f"    vm_network: {network!r}\n"
    )
    with pytest.raises(ConfigError, match=r"vm_network.*user or bridge:NAME"):
        load_config(config, check_files=False)
