"""Loading and validating the configuration: defaults, merging, and one-line errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from lmrunner.config import BackendName, Config, MjfEnvStyle
from lmrunner.errors import ConfigError
from lmrunner.loader import load_config

GOOD = """\
factory:
  space: vac01.example.com
  state_dir: {state}
machinetypes:
  lhcb-dc:
    backend: docker
    image: docker://vcbusybox:latest
    target_share: 1.0
"""


def write(tmp_path: Path, text: str, name: str = "lmrunner.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).format(state=tmp_path / "state"))
    return path


def load(path: Path, **kwargs: object) -> Config:
    options: dict[str, object] = {"hostname": "factory01.example.com", "cpus": 8}
    options.update(kwargs)
    return load_config(path, **options)  # type: ignore[arg-type]


def errors_of(path: Path, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(path, **kwargs)
    return list(caught.value.errors)


def test_defaults_match_vac(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD))
    factory = config.factory
    assert (factory.mb_per_processor, factory.overload_per_processor) == (2048, 1.25)
    assert (factory.processors_per_superslot, factory.total_processors) == (1, 8)
    assert factory.hostname == "factory01.example.com"
    mt = config.machinetypes["lhcb-dc"]
    assert mt.backend is BackendName.DOCKER
    assert (mt.min_processors, mt.max_processors, mt.max_wallclock_seconds) == (1, 1, 86400)
    assert (mt.backoff_seconds, mt.fizzle_seconds, mt.heartbeat_seconds) == (10, 600, 0)
    assert mt.effective_min_wallclock == 86400
    assert mt.container_command == "/user_data"
    assert mt.machines_dir_days == 3.0
    assert mt.effective_machinegroup == "lhcb-dc"
    assert mt.mjf_env_style is MjfEnvStyle.AUTO  # http on VMs (Vac's metadata service)
    assert config.warnings == ()


def test_conf_d_merges_in_name_order(tmp_path: Path) -> None:
    main = write(tmp_path, GOOD)
    write(tmp_path, "factory:\n  draining: true\n  mb_per_processor: 1000\n", "conf.d/10-a.yaml")
    write(tmp_path, "factory:\n  mb_per_processor: 3000\n", "conf.d/20-b.yaml")
    write(
        tmp_path,
        "machinetypes:\n  atlas:\n    backend: vm\n    image: /srv/atlas.qcow2\n",
        "conf.d/30-c.yaml",
    )
    config = load(main)
    assert config.factory.draining is True
    assert config.factory.mb_per_processor == 3000
    assert set(config.machinetypes) == {"atlas", "lhcb-dc"}
    assert config.machinetypes["lhcb-dc"].image == "docker://vcbusybox:latest"
    assert [p.name for p in config.files] == [
        "lmrunner.yaml",
        "10-a.yaml",
        "20-b.yaml",
        "30-c.yaml",
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1893456000", 1893456000),
        ("'2030-01-01T00:00:00Z'", 1893456000),
        ("'2030-01-01T01:00:00+01:00'", 1893456000),
        ("'2030-01-01 00:00:00'", 1893456000),  # naive = UTC
        ("null", None),
    ],
)
def test_shutdown_time_takes_unix_or_iso(tmp_path: Path, value: str, expected: int | None) -> None:
    path = write(tmp_path, GOOD.replace("factory:\n", f"factory:\n  shutdown_time: {value}\n"))
    assert load(path).factory.shutdown_time == expected


def test_vac_style_lists_and_booleans(tmp_path: Path) -> None:
    text = GOOD + "    cvmfs_repositories: lhcb.cern.ch grid.cern.ch\n    user_data_proxy: 'no'\n"
    mt = load(write(tmp_path, text)).machinetypes["lhcb-dc"]
    assert mt.cvmfs_repositories == ("lhcb.cern.ch", "grid.cern.ch")
    assert mt.user_data_proxy is False


def test_config_objects_are_frozen(tmp_path: Path) -> None:
    config = load(write(tmp_path, GOOD))
    with pytest.raises(AttributeError):
        config.factory.draining = True  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.factory.user_data_options["x"] = "y"  # type: ignore[index]


# Twenty kinds of bad configuration, each with its exact one-line error. {f} is the file.
BAD = [
    (  # 1: a typo in a key
        GOOD + "    max_procesors: 2\n",
        "{f}:9: machinetypes.lhcb-dc.max_procesors: unknown key; did you mean 'max_processors'?",
    ),
    (  # 2: an unknown top-level section
        GOOD + "machintypes: {{}}\n",
        "{f}:9: machintypes: unknown key; did you mean 'machinetypes'?",
    ),
    (  # 3: a missing required key
        GOOD.replace("  space: vac01.example.com\n", ""),
        "{f}:2: factory.space: required; Name of the space of factories sharing target shares; "
        "also the virtual CE name, APEL SubmitHost and DN.",
    ),
    (  # 4: not a number
        GOOD.replace("target_share: 1.0", "target_share: lots"),
        "{f}:8: machinetypes.lhcb-dc.target_share: expected a number >= 0, got 'lots'",
    ),
    (  # 5: below the minimum
        GOOD + "    min_processors: 0\n",
        "{f}:9: machinetypes.lhcb-dc.min_processors: expected an integer >= 1, got 0",
    ),
    (  # 6: a boolean where an integer belongs
        GOOD + "    fizzle_seconds: true\n",
        "{f}:9: machinetypes.lhcb-dc.fizzle_seconds: expected an integer >= 0, got True",
    ),
    (  # 7: an unknown backend
        GOOD.replace("backend: docker", "backend: libvirt"),
        "{f}:6: machinetypes.lhcb-dc.backend: expected one of 'docker', 'apptainer', 'vm', "
        "'fake', got 'libvirt'",
    ),
    (  # 8: not an FQDN
        GOOD.replace("vac01.example.com", "vac01"),
        "{f}:2: factory.space: expected a fully qualified domain name such as vac01.example.com, "
        "got 'vac01'",
    ),
    (  # 9: a relative state_dir
        GOOD.replace("state_dir: {state}", "state_dir: var/lib/lmrunner"),
        "{f}:3: factory.state_dir: expected an absolute path, got 'var/lib/lmrunner'",
    ),
    (  # 10: max below min
        GOOD + "    min_processors: 4\n    max_processors: 2\n",
        "{f}:10: machinetypes.lhcb-dc.max_processors: expected at least min_processors (4), got 2",
    ),
    (  # 11: min wallclock above max
        GOOD + "    max_wallclock_seconds: 100\n    min_wallclock_seconds: 200\n",
        "{f}:10: machinetypes.lhcb-dc.min_wallclock_seconds: expected at most "
        "max_wallclock_seconds (100), got 200",
    ),
    (  # 12: more processors than this host offers
        GOOD.replace("factory:\n", "factory:\n  total_processors: 64\n"),
        "{f}:2: factory.total_processors: expected at most the 8 CPUs this process may use, got 64",
    ),
    (  # 13: an unparseable shutdown time
        GOOD.replace("factory:\n", "factory:\n  shutdown_time: next tuesday\n"),
        "{f}:2: factory.shutdown_time: expected a Unix time or ISO 8601 time, got 'next tuesday'",
    ),
    (  # 14: a bad machinetype name
        GOOD.replace("lhcb-dc:", "LHCb_DC:"),
        "{f}:5: machinetypes.LHCb_DC: expected a name of lower-case letters, digits and '-'",
    ),
    (  # 15: a machinetype that is not a mapping
        GOOD + "  atlas: docker\n",
        "{f}:9: machinetypes.atlas: expected a mapping of options",
    ),
    (  # 16: a duplicate key
        GOOD + "    target_share: 2.0\n",
        "{f}:9: target_share: duplicate key (first given at line 8)",
    ),
    (  # 17: a cvmfs repository with a slash
        GOOD + "    cvmfs_repositories: [lhcb.cern.ch/x]\n",
        "{f}:9: machinetypes.lhcb-dc.cvmfs_repositories: expected repository names without '/', "
        "got a list",
    ),
    (  # 18: plain http user_data
        GOOD + "    user_data: http://example.org/ud\n",
        "{f}:9: machinetypes.lhcb-dc.user_data: 'http://example.org/ud': http:// needs "
        "factory.allow_http: true (no TLS), or use https://",
    ),
    (  # 19: a missing user_data file
        GOOD + "    user_data: /nonexistent/user_data\n",
        "machinetypes.lhcb-dc: machinetypes.lhcb-dc.user_data: expected a readable file, "
        "/nonexistent/user_data is not",
    ),
    (  # 20: invalid YAML
        GOOD + "    tmp_binds: [/scratch\n",
        "{f}:10: invalid YAML: expected ',' or ']', but got '<stream end>'",
    ),
    (  # 21: an option name that is not [a-z0-9_]
        GOOD + "    user_data_options: {{Queue-Name: default}}\n",
        "{f}:9: machinetypes.lhcb-dc.user_data_options: expected names of [a-z0-9_] only "
        "(not 'Queue-Name'), got a mapping",
    ),
    (  # 22: machinefeatures options may not replace standard keys
        GOOD.replace("factory:\n", "factory:\n  machinefeatures_options: {{total_cpu: '99'}}\n"),
        "{f}:2: factory.machinefeatures_options: expected extra keys only; total_cpu is a "
        "standard machinefeatures key",
    ),
    (  # 23: a bad regular expression
        GOOD + "    image_signing_dn: '(unclosed'\n",
        "{f}:9: machinetypes.lhcb-dc.image_signing_dn: expected a regular expression "
        "(missing ), unterminated subpattern at position 0)",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD, ids=[f"bad{i + 1}" for i in range(len(BAD))])
def test_bad_configuration_gives_one_exact_line(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    if (expected.startswith("{f}:") and "invalid YAML" in expected) or "duplicate key" in expected:
        with pytest.raises(ConfigError) as caught:
            load(path)
        assert str(caught.value) == expected.format(f=path)
        return
    assert errors_of(path) == [expected.format(f=path)]


def test_all_errors_are_reported_at_once(tmp_path: Path) -> None:
    text = GOOD + "    max_procesors: 2\n    min_processors: zero\n"
    text = text.replace("factory:\n", "factory:\n  draining: maybe\n")
    lines = errors_of(write(tmp_path, text))
    assert len(lines) == 3
    assert all("\n" not in line for line in lines)


def test_loading_never_half_applies(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    good = load(path)
    path.write_text(path.read_text() + "    bogus: 1\n")
    with pytest.raises(ConfigError):
        load(path)
    assert good.machinetypes["lhcb-dc"].target_share == 1.0  # the old object is untouched
