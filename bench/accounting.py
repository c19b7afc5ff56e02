#!/usr/bin/env python3
"""Accounting accuracy and limit enforcement of one backend's LMs, measured by their cgroups.

Runs the scenarios of issue 6 (``tests/integration/accounting.py``) against the real engine and
the host's cgroup controller (v1 on hybrid hosts, v2 when unified):
  - accuracy: a payload burns CPU for 8 s and reports its own CPU time from /proc (the raw
    figure); the LM's accounted CPU seconds are compared with it (target: within 2 %). For VMs
    the raw figure is QEMU's own CPU time (/proc/PID/stat), sampled with the cgroup's;
  - enforcement: two busy loops in a 1-processor LM, CPUs used over 10 s (target <= 1.05);
  - memory: a hog in a 64 MiB LM, its peak against the limit, and the outcome (must be oom).
The last two are not run for VMs (null): a 1-vCPU guest cannot run two loops at once, and its
own kernel kills a hog before the cgroup's limit is reached.
``--repeat`` runs the accuracy scenario several times and reports the median error.
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmrunner.lmcgroups import host_cgroups  # noqa: E402
from tests.integration import accounting as scenarios  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="docker", choices=sorted(scenarios.MACHINETYPES))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    errors, known, accounted = [], [], []
    for index in range(args.repeat):
        with scenarios.rig(args.backend) as rig:
            figures = scenarios.accuracy(args.backend)(rig)
            if index == 0:
                cgroups = host_cgroups(rig.config("#!/bin/sh\n").factory)
        errors.append(figures["error"])
        known.append(figures["known_cpu_s"])
        accounted.append(figures["accounted_cpu_s"])
    loops = hog = None
    if args.backend in scenarios.PAYLOAD_IN_CGROUP:
        with scenarios.rig(args.backend) as rig:
            loops = scenarios.two_loops_are_held_to_one_cpu(rig)
        with scenarios.rig(args.backend) as rig:
            hog = scenarios.hog_is_oom_killed(rig)
    result = {
        "benchmark": "accounting",
        "backend": args.backend,
        "cgroup_version": None if cgroups is None else cgroups.version,
        "repeat": args.repeat,
        "cpu_error_median": statistics.median(errors),
        "cpu_error_max": max(errors),
        "known_cpu_s": [round(x, 3) for x in known],
        "accounted_cpu_s": [round(x, 3) for x in accounted],
        "two_loops_cpus": None if loops is None else loops["cpus"],
        "hog_peak_over_limit": None if hog is None else hog["peak_bytes"] / hog["limit_bytes"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
