"""The cgroup controller (v2 first, v1 fallback) used by every backend.

Installed as ``lmrunner.cgroups`` (the repository keeps this folder at top level).
:func:`open_controller` is the only place that chooses a driver; everything else uses the
:class:`~lmrunner.cgroups.base.CgroupController` interface.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from lmrunner.cgroups.base import CgroupController, CgroupRef, Usage
from lmrunner.cgroups.mountinfo import CgroupMounts, Mode, detect, own_cgroups, parse
from lmrunner.cgroups.systemd import SystemdController, is_systemd_booted
from lmrunner.cgroups.v1 import OPTIONAL, REQUIRED, V1Controller
from lmrunner.cgroups.v2 import V2Controller
from lmrunner.errors import CgroupError, CgroupUnsupported

__all__ = [
    "CgroupController",
    "CgroupMounts",
    "CgroupRef",
    "Mode",
    "SystemdController",
    "Usage",
    "V1Controller",
    "V2Controller",
    "detect",
    "open_controller",
    "parse",
]


def _reroot(path: PurePosixPath, root_override: Path | None) -> Path:
    """``path`` as seen from ``root_override`` (a fake filesystem root in tests)."""
    return Path(path) if root_override is None else root_override / path.relative_to("/")


def _v1_bases(
    mounts: CgroupMounts,
    own: dict[str, str],
    root_override: Path | None,
    controllers: Iterable[str],
    *,
    absolute: bool,
) -> dict[str, Path]:
    """Per controller: its mount point, joined with this process's own cgroup in it unless the
    parent is ``absolute``.

    ``/proc/self/cgroup`` paths are relative to the hierarchy's root; the mount may show only a
    subtree of it (mountinfo field 4, e.g. inside a cgroup namespace), so that part is dropped.
    """
    bases: dict[str, Path] = {}
    for controller in controllers:
        mount = mounts.v1.get(controller)
        if mount is None:
            continue
        base = _reroot(mount.mount_point, root_override)
        own_path = PurePosixPath(own.get(controller, "/"))
        if not absolute and own_path.is_relative_to(mount.root):
            base = base / own_path.relative_to(mount.root)
        bases[controller] = base
    return bases


def open_controller(
    parent: str,
    *,
    mountinfo_path: Path = Path("/proc/self/mountinfo"),
    proc_cgroup_path: Path = Path("/proc/self/cgroup"),
    root_override: Path | None = None,
    memory_high_ratio: float = 0.95,
    manager: str = "auto",
    systemd_dir: Path = Path("/run/systemd/system"),
) -> CgroupController:
    """The controller for this host: v2 when unified (through systemd's slices when ``manager``
    is ``systemd``, or ``auto`` and systemd is PID 1), v1 on hybrid and legacy hosts.

    On hybrid hosts the v1 controllers hold the limits (their cgroup2 mount usually has no
    controller enabled). A ``parent`` starting with ``/`` is taken from each hierarchy's root, as
    Docker's cgroupfs driver takes ``cgroup_parent``, so the LM cgroups have one path everywhere
    (:meth:`~CgroupController.engine_path`); a relative one goes under this process's own cgroup
    in each v1 hierarchy (v2 always starts at the cgroup2 mount). ``root_override`` is prepended
    to every mount point (tests point it at a fake cgroupfs). Raises CgroupUnsupported when no
    cgroup filesystem is mounted or the v1 hierarchies lmrunner needs are missing.
    """
    try:
        mounts = parse(mountinfo_path.read_text())
        own_text = proc_cgroup_path.read_text() if proc_cgroup_path.exists() else ""
    except OSError as err:
        raise CgroupUnsupported(f"cannot read the cgroup layout: {err}") from err
    if mounts.mode is Mode.UNIFIED:
        assert mounts.v2 is not None
        if manager == "systemd" or (manager == "auto" and is_systemd_booted(systemd_dir)):
            return SystemdController(
                _reroot(mounts.v2, root_override), parent, memory_high_ratio=memory_high_ratio
            )
        return V2Controller(
            _reroot(mounts.v2, root_override), parent, memory_high_ratio=memory_high_ratio
        )
    if mounts.mode in (Mode.HYBRID, Mode.LEGACY):
        own = own_cgroups(own_text)
        absolute = parent.startswith("/")
        used = (*REQUIRED, *OPTIONAL)
        others = _v1_bases(
            mounts, own, root_override, [n for n in mounts.v1 if n not in used], absolute=absolute
        )
        if mounts.v2 is not None:  # hybrid: runc makes the container's cgroup there too
            unified = _reroot(mounts.v2, root_override)
            own_v2 = own.get("", "/").lstrip("/")
            others["unified"] = unified if absolute or not own_v2 else unified / own_v2
        try:
            return V1Controller(
                _v1_bases(mounts, own, root_override, used, absolute=absolute),
                parent,
                roots=_v1_bases(mounts, own, root_override, used, absolute=True),
                others=others,
            )
        except CgroupError as err:
            raise CgroupUnsupported(str(err)) from err
    raise CgroupUnsupported("no cgroup filesystem is mounted")
