"""Property-based fuzzing of everything lmrunner parses from outside: the YAML configuration,
Vac's INI files, Vacuum Pipe documents (fetched and cached) and shutdown_message files.

Each property: a valid result, or the project's error (an LmrunnerError) in one printable line
per problem; never any other exception. ``pytest --hypothesis-show-statistics`` reports how many
examples each property ran.
"""

from __future__ import annotations

import codecs
import dataclasses
import enum
import json
import math
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lmrunner.config import Config, FactoryConfig, MachinetypeConfig, PipeConfig
from lmrunner.errors import ConfigError, LmrunnerError
from lmrunner.lifecycle import parse_shutdown_message
from lmrunner.loader import load_config
from lmrunner.pipes import ACCEPTED_KEYS, parse_document, read_cache
from lmrunner.schema import REQUIRED, fields_of
from lmrunner.untrusted import read_message
from lmrunner.vacconf import Conversion, convert_vac_conf
from lmrunner.vactables import vac_names

HOST = "factory01.example.com"
URL = "https://pipes.example.com/vo.json"


def fuzz(examples: int) -> settings:
    """Settings of one property: ``examples`` runs, no deadline (file I/O varies)."""
    # Function-scoped tmp_path is fine here: every example overwrites the same files.
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


def assert_one_line(err: LmrunnerError) -> None:
    """The error's message (each of a ConfigError's problems) is one printable line."""
    lines = err.errors if isinstance(err, ConfigError) else (str(err),)
    assert lines
    for line in lines:
        assert line and line.isprintable(), repr(line)


def result_or_error(call: Any, *args: Any, **kwargs: Any) -> Any:
    """``call``'s result, or None when it raised an LmrunnerError of one-line problems."""
    try:
        result = call(*args, **kwargs)
    except LmrunnerError as err:
        assert_one_line(err)
        event(f"{call.__name__}: {type(err).__name__}")
        return None
    event(f"{call.__name__}: {'no result' if result is None else 'result'}")
    return result


def assert_config(config: Config | None) -> None:
    if config is not None:
        assert isinstance(config, Config)
        assert all(line.isprintable() for line in config.warnings), config.warnings


# --- values ---------------------------------------------------------------------------------

#: Text that breaks naive code: line breaks of every kind, NUL, surrogates, controls, BOM.
ODD_CHARS = "\n\r\x00\x0b\x0c\x1c\x85\u2028\u2029\ud800\udfff\ufeff\t\x1b'\"\\:#&*!|>-[]{},%@`"
texts = st.text(st.characters(codec=None) | st.sampled_from(ODD_CHARS), max_size=30)
numbers = (
    st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.just(10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
)
plausible = st.sampled_from(
    [
        "vac01.example.com",
        "docker",
        "vm",
        "apptainer",
        "fake",
        "docker://vcbusybox",
        "/tmp",
        "/nonexistent/file",
        "https://example.com/ud",
        "2026-01-01T00:00:00",
        "yes",
        "1",
        "-1",
        "1e999",
        "nan",
        "",
    ]
)
scalars = st.none() | st.booleans() | numbers | texts | plausible
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(texts | plausible, inner, max_size=4)
    ),
    max_leaves=12,
)
#: YAML that only a loader with tags, anchors or odd scalars produces.
RAW_YAML = [
    "!!binary aGVsbG8=",
    "!!binary not*base64",
    "!!timestamp 2024-13-45",
    "2001-12-14t21:59:43.10-99:00",
    "2024-02-30",
    "!!int abc",
    "!!float x",
    "!!bool maybe",
    "!!null x",
    "!!set {a, b}",
    "!!omap [a: 1, b: 2]",
    "!!pairs [a: 1, a: 2]",
    "!!str 12",
    "!!python/object/apply:os.system [echo]",
    "!!python/name:os.system",
    "!custom x",
    "0x" + "f" * 40,
    "1" * 4400,
    "1:2:3:4:5:6:7:8:9:10:11:12:13:14",
    "0o777",
    ".inf",
    "-.inf",
    ".nan",
    "&a [*a]",
    "*undefined",
    '"\\0"',
    '"\\ud800"',
    '"\\U0A010000"',
    '"\\x1b[31m"',
    '"a\\nb"',
    "[" * 200 + "]" * 200,
    "{a: 1, a: 2}",
    "{? [a]: 1}",
    "{[a]: 1}",
    "{<<: 1}",
    "~",
]


def yaml_scalar(value: Any) -> str:
    """``value`` as one line of flow YAML."""
    return yaml.safe_dump([value], default_flow_style=True, width=math.inf).strip()[1:-1]


yaml_values = st.builds(yaml_scalar, json_values) | st.sampled_from(RAW_YAML)


#: Values that are right for an option of each type, so that loading gets past the options.
GOOD_BY_TYPE: dict[Any, list[Any]] = {
    int: [0, 1, 2, 3600],
    float: [0.0, 0.75, 1.0, 2.5],
    bool: [True, False],
    Path: ["/tmp", "/nonexistent"],
}


def plain(value: Any) -> Any:
    """A default as YAML writes it (enums and paths as text, tuples as lists)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    return list(value) if isinstance(value, tuple) else value


def good_values(cls: type[Any]) -> dict[str, list[str]]:
    """Each option of ``cls``: its default and values of its type, as flow YAML."""
    out: dict[str, list[str]] = {}
    for f, hint in fields_of(cls):
        values = [] if f.default in (REQUIRED, dataclasses.MISSING) else [f.default]
        for kind, samples in GOOD_BY_TYPE.items():
            if kind == hint or kind in typing.get_args(hint):
                values += samples
        if typing.get_origin(hint) is Mapping:
            values += [{}, {"a": "b"}]
        out[f.name] = [yaml_scalar(plain(value)) for value in values] or ["null"]
    return out


GOOD = {cls: good_values(cls) for cls in (FactoryConfig, MachinetypeConfig, PipeConfig)}


@st.composite
def section(draw: st.DrawFn, cls: type[Any]) -> list[tuple[str, str]]:
    """Options of ``cls`` (and a few unknown ones), each with a right or a random value."""
    known = [key for key in GOOD[cls] if key not in ("space", "hostname", "url")]  # given
    keys = st.sampled_from([*known, "unknown", "target_shar", "a\nb", "<<"])
    out = []
    for key in draw(st.lists(keys, max_size=6, unique=True)):
        # Mostly right values, so that the rest of a document gets loaded too.
        hostile = draw(st.sampled_from([False] * 4 + [True]))
        good = st.sampled_from(GOOD[cls].get(key, ["1"]))
        out.append((key, draw(yaml_values if hostile else good)))
    return out


@st.composite
def yaml_documents(draw: st.DrawFn) -> str:
    """A configuration of known options with random (and hostile) values, as YAML text."""
    lines = ["factory:", "  space: vac01.example.com", f"  hostname: {HOST}"]
    lines += [f"  {json.dumps(k)}: {v}" for k, v in draw(section(FactoryConfig))]
    lines.append("machinetypes:")
    names = st.sampled_from(["lhcb", "vo-prod", "Bad_Name", "x" * 70, ""])
    for name in draw(st.lists(names, max_size=2, unique=True)):
        lines.append(f"  {json.dumps(name)}:")
        base = draw(st.booleans())
        if base:
            lines += ["    backend: fake", "    image: docker://vcbusybox"]
        options = draw(section(MachinetypeConfig))
        lines += [f"    {json.dumps(k)}: {v}" for k, v in options]
        if not base and not options:
            lines[-1] += " {}"
    if draw(st.booleans()):
        lines += ["vacuum_pipes:", "  vo:", f"    url: {URL}"]
        lines += [f"    {json.dumps(k)}: {v}" for k, v in draw(section(PipeConfig))]
    # Now and then a top level that is wrong in itself.
    top = draw(st.sampled_from([None] * 8 + ["extra", "factory", "- x", "? "]))
    if top is not None:
        lines.append(f"{top}: {draw(yaml_values)}")
    return "\n".join(lines) + "\n"


def mutated(data: bytes, edits: list[tuple[int, bytes]]) -> bytes:
    """``data`` with each edit's bytes put in at its (wrapped) position."""
    out = bytearray(data)
    for where, insert in edits:
        at = where % (len(out) + 1)
        out[at : at + len(insert)] = insert
    return bytes(out)


def byte_inputs(texts_: st.SearchStrategy[str]) -> st.SearchStrategy[bytes]:
    """Random bytes, and valid-looking text with random bytes written over parts of it."""
    valid = texts_.map(lambda text: text.encode("utf-8", "surrogatepass"))
    edits = st.lists(
        st.tuples(st.integers(0, 10**6), st.binary(min_size=1, max_size=4)), max_size=3
    )
    bom = st.sampled_from([b"", codecs.BOM_UTF8, codecs.BOM_UTF16_LE])
    return (
        st.binary(max_size=200)
        | valid
        | st.builds(mutated, valid, edits)
        | st.builds(lambda b, d: b + d, bom, valid)
    )


# --- the YAML configuration -----------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "conf.d").mkdir()
    return tmp_path


@fuzz(300)
@given(data=byte_inputs(yaml_documents()))
def test_config_loader_takes_any_bytes(site: Path, data: bytes) -> None:
    path = site / "lmrunner.yaml"
    path.write_bytes(data)
    assert_config(result_or_error(load_config, path, hostname=HOST, cpus=8))


@fuzz(300)
@given(main=yaml_documents(), extra=st.none() | yaml_documents() | st.binary(max_size=40))
def test_config_loader_takes_any_options(site: Path, main: str, extra: str | bytes | None) -> None:
    path = site / "lmrunner.yaml"
    path.write_text(main)
    confd = site / "conf.d" / "50-extra.yaml"
    confd.unlink(missing_ok=True)
    if extra is not None:
        confd.write_bytes(extra if isinstance(extra, bytes) else extra.encode())
    assert_config(result_or_error(load_config, path, hostname=HOST, cpus=8))


# --- Vac's INI files ------------------------------------------------------------------------

VAC_OPTIONS = sorted(
    {*vac_names(FactoryConfig), *vac_names(MachinetypeConfig), *vac_names(PipeConfig)}
    - {"user_data_option_*", "user_data_file_*", "machinefeatures_option_*"}
    | {"user_data_option_x", "user_data_file_ca", "machinefeatures_option_hs06", "volume_group"}
)
ini_values = (
    texts.map(lambda t: t.replace("\n", " ").replace("\r", " "))
    | plausible
    | numbers.map(str)
    | st.just("first\n  continued")
)
ini_headers = st.sampled_from(
    [
        "settings",
        "machinetype lhcb",
        "vmtype old",
        "vacuum_pipe vo",
        "machinetype Bad!",
        "targetshares",
        "x]",
    ]
) | texts.map(lambda t: t.replace("\n", "").replace("\r", "").replace("]", ""))


@st.composite
def ini_documents(draw: st.DrawFn) -> str:
    """A vac.conf of known options with random (and hostile) values."""
    lines = ["[settings]", "vac_space = vac01.example.com"] if draw(st.booleans()) else []
    for header in draw(st.lists(ini_headers, max_size=3)):
        lines.append(f"[{header}]")
        for _ in range(draw(st.integers(0, 5))):
            key = draw(st.sampled_from(VAC_OPTIONS) | texts.map(lambda t: t.replace("\n", "")))
            lines.append(f"{key} = {draw(ini_values)}")
    return "\n".join(lines) + "\n"


def check_conversion(tmp_path: Path, conversion: Conversion | None) -> None:
    if conversion is None:
        return
    assert all(line.isprintable() for line in (*conversion.dropped, *conversion.warnings))
    path = tmp_path / "converted.yaml"
    path.write_text(conversion.yaml_text)
    assert isinstance(yaml.safe_load(conversion.yaml_text), dict)
    # The converted YAML goes through the same loader as any other configuration.
    assert_config(result_or_error(load_config, path, hostname=HOST, cpus=8, check_files=False))


@fuzz(300)
@given(data=byte_inputs(ini_documents()))
def test_vac_conf_parser_takes_any_bytes(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "vac.conf"
    path.write_bytes(data)
    check_conversion(tmp_path, result_or_error(convert_vac_conf, [path]))


@fuzz(300)
@given(files=st.lists(ini_documents(), min_size=1, max_size=3))
def test_vac_conf_parser_takes_any_options(tmp_path: Path, files: list[str]) -> None:
    paths = []
    for index, text in enumerate(files):
        paths.append(tmp_path / f"{index}.conf")
        paths[-1].write_text(text, errors="surrogatepass")
    check_conversion(tmp_path, result_or_error(convert_vac_conf, paths))


# --- Vacuum Pipe documents ------------------------------------------------------------------

PIPE_ENTRY_KEYS = sorted(ACCEPTED_KEYS | {"user_data_option_x", "user_data_file_ca", "other"})


#: Values a pipe entry's keys take, right ones and ones Vac's rules reject.
PIPE_VALUES: dict[str, list[Any]] = {
    "suffix": ["prod", "test", "Prod", "a b", "\u00df", "", 5],
    "machine_model": ["docker", "singularity", "cernvm3", "vm-raw", "kvm", None],
    "root_image": ["docker://x", "/cvmfs/a/b", "img.iso", "https://h/x", "a/../b", "/etc/shadow"],
    "user_data": ["ud", "https://h/ud", "http://h/ud", "../ud", "/etc/passwd"],
    "target_share": [1, 0, 2.5, "3", -1, None, True],
    "cvmfs_repositories": [["a.cern.ch"], "a.cern.ch b.cern.ch", ["a/b"], 7],
    "tmp_binds": [["/tmp"], "/a /b", ["rel"]],
    "heartbeat_file": ["hb", "a/hb", None],
    "user_data_option_x": ["value", 5, None, {"a": 1}],
    "user_data_file_ca": ["ca.pem", "../ca.pem", "a/b"],
    "image_signing_dn": ["/CN=x", "(", "(a+)+$"],
}


@st.composite
def pipe_documents(draw: st.DrawFn) -> str:
    """A pipe document of accepted keys with random values, as JSON text (NaN and all)."""
    entries = []
    for _ in range(draw(st.integers(0, 3))):
        entry: dict[str, Any] = {"suffix": "prod", "machine_model": "docker", "root_image": "x"}
        for key in draw(st.lists(st.sampled_from(PIPE_ENTRY_KEYS), max_size=6, unique=True)):
            hostile = draw(st.sampled_from([False] * 3 + [True]))
            good = st.sampled_from(PIPE_VALUES.get(key, [1, 3600, True, "text"]))
            entry[key] = draw(json_values if hostile else good)
        entries.append(entry)
    document: Any = {"machinetypes": entries}
    if draw(st.booleans()):
        document["cache_seconds"] = draw(json_values)
    if draw(st.sampled_from([False] * 5 + [True])):
        document = draw(json_values)
    # ensure_ascii (the default): lone surrogates travel as \ud800 escapes, as a hostile
    # publisher would send them.
    return json.dumps(document)


@pytest.fixture
def pipe_site(tmp_path: Path) -> Path:
    path = tmp_path / "lmrunner.yaml"
    path.write_text(
        f"factory:\n  space: vac01.example.com\n  state_dir: {tmp_path / 'state'}\n"
        f"vacuum_pipes:\n  vo:\n    url: {URL}\n    target_share: 2\n"
        "machinetypes:\n  vo-prod:\n    max_processors: 2\n"
    )
    return path


def expand(path: Path, document: Any) -> None:
    """Turn a pipe document into machinetypes, as the factory and `lmrunner check` do.

    The site's own configuration is valid, so whatever the document holds it must load: a
    bad entry is rejected with a warning, never the whole configuration.
    """
    assert isinstance(document, dict)
    config = load_config(path, hostname=HOST, cpus=8, pipe_documents={"vo": document})
    assert_config(config)
    accepted = any(mt.pipe == "vo" for mt in config.machinetypes.values())
    event("pipe: some types accepted" if accepted else "pipe: no type accepted")


def deep_json(depth: int) -> str:
    return '{"machinetypes": [' + "[" * depth + "]" * depth + "]}"


@fuzz(300)
@given(
    body=byte_inputs(pipe_documents())
    | st.sampled_from([deep_json(50), deep_json(100000)]).map(str.encode)
)
def test_pipe_documents_take_any_bytes(pipe_site: Path, body: bytes) -> None:
    document = result_or_error(parse_document, body, URL)
    if document is not None:
        expand(pipe_site, document)


@fuzz(300)
@given(text=pipe_documents())
def test_pipe_documents_take_any_entries(pipe_site: Path, text: str) -> None:
    document = result_or_error(parse_document, text.encode(), URL)
    if document is not None:
        expand(pipe_site, document)


@fuzz(200)
@given(
    body=byte_inputs(
        st.builds(
            lambda doc, url, at: json.dumps(
                {"url": url, "fetched_at": at, "document": json.loads(doc)}
            ),
            pipe_documents(),
            st.sampled_from([URL] * 4) | json_values,
            st.sampled_from([1.7e9] * 4) | json_values,
        )
    )
)
def test_pipe_cache_takes_any_bytes(tmp_path: Path, body: bytes) -> None:
    path = tmp_path / "vo.json"
    path.write_bytes(body)
    cached = result_or_error(read_cache, path)
    if cached is not None:
        assert isinstance(cached.url, str) and math.isfinite(cached.fetched_at)
        assert isinstance(cached.document["machinetypes"], list)
        assert cached.cache_seconds > 0


# --- shutdown_message -----------------------------------------------------------------------

messages = byte_inputs(
    st.builds(
        lambda code, sep, text: f"{code}{sep}{text}",
        st.integers(-10, 1000),
        st.sampled_from(["", " ", "\t", "\n", "\x0b", "\u2028"]),
        texts,
    )
)


@fuzz(300)
@given(data=messages | st.binary(min_size=4000, max_size=5000))
def test_shutdown_messages_take_any_bytes(tmp_path: Path, data: bytes) -> None:
    (tmp_path / "joboutputs").mkdir(exist_ok=True)
    (tmp_path / "joboutputs" / "shutdown_message").write_bytes(data)
    text = result_or_error(read_message, tmp_path)
    assert text is None or isinstance(text, str)
    for candidate in (text, data.decode(errors="replace")):
        if candidate is None:
            continue
        parsed = result_or_error(parse_shutdown_message, candidate)
        if parsed is not None:
            code, reason = parsed
            assert 100 <= code <= 799 and isinstance(reason, str)
