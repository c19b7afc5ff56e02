"""Unit conversions and the persisted cgroup reference."""

from __future__ import annotations

import pytest

from lmrunner.cgroups.base import (
    CgroupRef,
    cpu_max_value,
    cpus_to_quota,
    cpus_to_shares,
    cpus_to_weight,
    memory_high,
    shares_to_weight,
)
from lmrunner.errors import CgroupError


@pytest.mark.parametrize(
    ("cpus", "quota"),
    [(1, 100_000), (2, 200_000), (0.5, 50_000), (1.25, 125_000), (0.001, 1000)],
)
def test_cpus_to_quota(cpus: float, quota: int) -> None:
    assert cpus_to_quota(cpus) == (quota, 100_000)


def test_cpu_max_value() -> None:
    assert cpu_max_value(1.5) == "150000 100000"
    assert cpu_max_value(1, period_us=50_000) == "50000 50000"


@pytest.mark.parametrize("bad", [0, -1.0])
def test_cpus_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError):
        cpus_to_quota(bad)


def test_shares_and_weight() -> None:
    assert cpus_to_shares(1) == 1024
    assert cpus_to_shares(0.001) == 2
    assert cpus_to_shares(10_000) == 262_144
    assert cpus_to_weight(1) == 100
    assert cpus_to_weight(0.001) == 1
    assert cpus_to_weight(1000) == 10_000
    assert shares_to_weight(2) == 1
    assert shares_to_weight(262_144) == 10_000
    assert shares_to_weight(1024) == 39  # runc's ConvertCPUSharesToCgroupV2Value


def test_memory_high_is_95_percent_in_pages() -> None:
    assert memory_high(100 * 1024 * 1024) == 99_614_720
    assert memory_high(100 * 1024 * 1024) % 4096 == 0
    assert memory_high(1) == 4096


def test_ref_json_round_trip() -> None:
    ref = CgroupRef(1, "lm1", (("cpu", "/c/cpu/lmrunner/lm1"), ("memory", "/c/m/lmrunner/lm1")))
    again = CgroupRef.from_json(ref.to_json())
    assert again == ref
    assert again.path("memory") is not None
    assert again.path("pids") is None


def test_ref_from_bad_json() -> None:
    with pytest.raises(CgroupError):
        CgroupRef.from_json('{"version": 2}')
