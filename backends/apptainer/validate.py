"""What ``validate`` refuses before anything of an LM exists: root, odd names, images and binds
apptainer cannot use, and paths the LM's account cannot reach (apptainer runs as that account)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from lmrunner.backends.apptainer.argv import ENV_NAME
from lmrunner.backends.apptainer.image import PULL_SCHEMES, is_registry_ref, local_image
from lmrunner.backends.base import MachineSpec
from lmrunner.errors import SpecError


def check(where: str, spec: MachineSpec) -> None:
    """Raise SpecError (its message starting with ``where``) when apptainer cannot run ``spec``.

    Raises:
        SpecError: the spec cannot be run.
        OSError: a path cannot even be looked at (too long, no access).
    """
    uid, gid = spec.owner
    if uid == 0:
        raise SpecError(f"{where}: LMs never run as root (factory.sc_user)")
    if not spec.command or not spec.command[0]:
        raise SpecError(f"{where}: empty container_command")
    bad = [key for key in spec.env if not ENV_NAME.fullmatch(key)]
    if bad:
        raise SpecError(f"{where}: invalid environment variable names {bad}")
    if is_registry_ref(spec.image):
        if len(spec.image.split("://", 1)[1]) == 0:
            raise SpecError(f"{where}: empty image reference {spec.image!r}")
    elif "://" in spec.image:
        schemes = ", ".join(PULL_SCHEMES)
        raise SpecError(
            f"{where}: image {spec.image!r}: only a directory, a SIF file or {schemes} refs"
        )
    else:
        image = local_image(spec)
        if not image.exists():
            raise SpecError(f"{where}: image {image} does not exist")
        if not (image.is_dir() or image.is_file()):
            raise SpecError(f"{where}: image {image} is neither a directory nor a SIF file")
        check_reachable(where, image, uid, gid, "the image")
    for mount in spec.mounts:
        for path in (str(mount.source), str(mount.target)):
            if ":" in path or "," in path:  # apptainer's --bind syntax has no escapes
                raise SpecError(f"{where}: bind path {path!r} holds ':' or ','")
        if not mount.source.exists():
            raise SpecError(f"{where}: bind source {mount.source} does not exist")
        check_reachable(where, mount.source, uid, gid, f"bind source of {mount.target}")
    check_reachable(where, spec.directory, uid, gid, "the LM directory")


def check_reachable(where: str, path: Path, uid: int, gid: int, what: str) -> None:
    """Raise SpecError when the LM's account cannot reach ``path`` (every folder above it needs
    search permission for it: apptainer runs as that account)."""
    groups = {gid}
    for folder in _folders_above(path):
        try:
            info = folder.stat()
        except OSError as err:
            raise SpecError(f"{where}: cannot look at {folder}: {err.strerror}") from err
        if not _permits(info, uid, groups, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            raise SpecError(
                f"{where}: {what} {path} is out of reach of uid {uid}: {folder} is "
                f"{stat.filemode(info.st_mode)} (owner uid {info.st_uid})"
            )
    try:
        info = path.stat()
    except OSError as err:
        raise SpecError(f"{where}: cannot look at {path}: {err.strerror}") from err
    if not _permits(info, uid, groups, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH):
        raise SpecError(f"{where}: {what} {path} is not readable by uid {uid}")


def _folders_above(path: Path) -> list[Path]:
    """``/``, then each folder down to ``path``'s parent (a seam for unit tests)."""
    return list(reversed(path.parents))


def _permits(
    info: os.stat_result, uid: int, groups: set[int], user: int, group: int, other: int
) -> bool:
    if info.st_uid == uid:
        return bool(info.st_mode & user)
    if info.st_gid in groups:
        return bool(info.st_mode & group)
    return bool(info.st_mode & other)
