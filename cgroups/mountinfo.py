"""Detection of the host's cgroup layout from ``/proc/self/mountinfo`` (pure functions).

The format of a mountinfo line is described in the kernel's
``Documentation/filesystems/proc.rst`` ("3.5 /proc/<pid>/mountinfo")::

    36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    (1)(2)(3)   (4)   (5)      (6)      (7)   (8) (9)   (10)         (11)

(7) is zero or more optional fields ended by ``-``; (9) is the filesystem type and (11) the
super-block options, which for a cgroup v1 mount name its controllers (``rw,cpu,cpuacct``) or a
named hierarchy (``name=systemd``). Paths escape space, tab, newline and backslash as octal
(``\\040``). See ``Documentation/admin-guide/cgroup-v1/cgroups.rst`` and
``Documentation/admin-guide/cgroup-v2.rst`` ("Mounting").
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

#: The cgroup v1 controllers the kernel knows (``name=...`` hierarchies are kept as written).
V1_CONTROLLERS = frozenset(
    {
        "blkio",
        "cpu",
        "cpuacct",
        "cpuset",
        "debug",
        "devices",
        "freezer",
        "hugetlb",
        "memory",
        "misc",
        "net_cls",
        "net_prio",
        "perf_event",
        "pids",
        "rdma",
    }
)

_OCTAL = re.compile(r"\\([0-7]{3})")


class Mode(enum.Enum):
    """The cgroup layout of a host."""

    UNIFIED = "unified"  # cgroup v2 only (no v1 controller hierarchy)
    HYBRID = "hybrid"  # v1 controller hierarchies plus a cgroup2 mount (systemd "hybrid")
    LEGACY = "legacy"  # v1 controller hierarchies only
    NONE = "none"  # no cgroup filesystem mounted


@dataclass(frozen=True, slots=True)
class V1Mount:
    """One mount of a cgroup v1 hierarchy."""

    mount_point: PurePosixPath
    #: The hierarchy's path mounted there (field 4); "/" unless inside a cgroup namespace.
    root: PurePosixPath
    controllers: frozenset[str]


@dataclass(frozen=True, slots=True)
class CgroupMounts:
    """The parsed cgroup mounts: what :func:`parse` returns."""

    mode: Mode
    #: Controller (or ``name=systemd``) -> its first mount; joined controllers share one entry.
    v1: dict[str, V1Mount] = field(default_factory=dict)
    #: Where cgroup2 is mounted (the first such mount), if anywhere.
    v2: PurePosixPath | None = None


def _unescape(text: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), text)


def parse(mountinfo_text: str) -> CgroupMounts:
    """Parse mountinfo text into the cgroup mounts and the :class:`Mode` they make up.

    Lines that are not cgroup mounts, or are malformed, are ignored. Only controllers count for
    the mode: a v1 ``name=systemd`` hierarchy next to cgroup2 alone is still UNIFIED for resource
    control (no v1 controller could hold a limit).
    """
    v1: dict[str, V1Mount] = {}
    v2: PurePosixPath | None = None
    for line in mountinfo_text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 3:
            continue
        fstype, superopts = fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else ""
        mount_point = PurePosixPath(_unescape(fields[4]))
        if fstype == "cgroup2":
            v2 = v2 or mount_point
        elif fstype == "cgroup":
            opts = superopts.split(",")
            names = {o for o in opts if o in V1_CONTROLLERS or o.startswith("name=")}
            mount = V1Mount(mount_point, PurePosixPath(_unescape(fields[3])), frozenset(names))
            for name in names:
                v1.setdefault(name, mount)
    has_v1_controllers = any(name in V1_CONTROLLERS for name in v1)
    if has_v1_controllers:
        mode = Mode.HYBRID if v2 is not None else Mode.LEGACY
    elif v2 is not None:
        mode = Mode.UNIFIED
    else:
        mode = Mode.NONE
    return CgroupMounts(mode=mode, v1=v1, v2=v2)


def detect(mountinfo_text: str) -> Mode:
    """The :class:`Mode` of the host whose ``/proc/self/mountinfo`` is ``mountinfo_text``."""
    return parse(mountinfo_text).mode


def own_cgroups(proc_self_cgroup_text: str) -> dict[str, str]:
    """Parse ``/proc/self/cgroup``: controller (or ``name=...``, or ``""`` for v2) -> path.

    Each line is ``hierarchy-ID:controller-list:path``; the v2 line is ``0::/path``
    (``Documentation/admin-guide/cgroup-v2.rst``, "Processes").
    """
    result: dict[str, str] = {}
    for line in proc_self_cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for name in controllers.split(",") if controllers else [""]:
            result[name] = path
    return result
