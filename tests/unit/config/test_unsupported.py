"""Options accepted without effect: schema.option(unsupported=...), and where they are listed."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from lmrunner.config import Config, FactoryConfig, MachinetypeConfig, PipeConfig
from lmrunner.schema import fields_of, info_of, option, unsupported_values
from lmrunner.vactables import unsupported_options


@dataclass(frozen=True)
class _Options:
    kept: int = option(1, "An option that works.")
    ignored: tuple[str, ...] = option(
        (), "An option that does not.", unsupported="not supported yet: later"
    )
    mapping: Any = option({}, "A mapping that does not.", unsupported="not supported by x: y")


def test_only_options_set_away_from_their_default_are_listed() -> None:
    assert unsupported_values(_Options(), "here") == []
    assert unsupported_values(_Options(kept=2, ignored=()), "here") == []
    assert unsupported_values(_Options(ignored=("a",), mapping={"k": "v"}), "here") == [
        ("here", "ignored", "not supported yet: later"),
        ("here", "mapping", "not supported by x: y"),
    ]
    assert unsupported_values(_Options(mapping=MappingProxyType({})), "here") == []


@pytest.mark.parametrize("text", ["ignored for now", "not supported\nby lmrunner"])
def test_the_reason_is_one_line_saying_not_supported(text: str) -> None:
    with pytest.raises(ValueError, match="one line starting 'not supported'"):
        option(0, "An option.", unsupported=text)


def test_the_vac_options_lmrunner_does_not_act_on_are_marked() -> None:
    marked = {
        f"{cls.__name__}.{f.name}": info_of(f).unsupported
        for cls in (FactoryConfig, MachinetypeConfig, PipeConfig)
        for f, _hint in fields_of(cls)
        if info_of(f).unsupported
    }
    yet: set[str] = set()  # options lmrunner will act on later
    assert set(marked) == yet | {
        "FactoryConfig.version_logger",
        "FactoryConfig.gocdb_cert_file",
        "FactoryConfig.gocdb_key_file",
        "MachinetypeConfig.image_signing_dn",
        "MachinetypeConfig.root_device",
        "MachinetypeConfig.scratch_device",
    }
    for name, text in marked.items():
        assert text.startswith("not supported yet: " if name in yet else "not supported by ")


def test_unsupported_options_cover_factory_machinetypes_and_pipe_overrides() -> None:
    factory = FactoryConfig(space="vac.example.com", gocdb_key_file=Path("/etc/k.pem"))
    mt = MachinetypeConfig(name="cms", backend="vm", image="x.iso", root_device="sda")  # type: ignore[arg-type]
    pipe = PipeConfig(
        name="vo",
        url="https://vo.example.com/p",
        overrides=MappingProxyType({"image_signing_dn": "/CN=x", "scratch_device": "vdb"}),
    )
    config = Config(factory=factory, machinetypes={"cms": mt}, pipes={"vo": pipe}, files=())
    assert [(p, o) for p, o, _r in unsupported_options(config)] == [
        ("factory", "gocdb_key_file"),
        ("machinetypes.cms", "root_device"),
        ("vacuum_pipes.vo.overrides", "image_signing_dn"),
    ]
    quiet = replace(config, factory=replace(factory, gocdb_key_file=None), pipes={})
    assert unsupported_options(replace(quiet, machinetypes={})) == []
