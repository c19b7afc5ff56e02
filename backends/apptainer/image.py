"""The image an LM runs: a local directory or SIF file, or a registry reference pulled once.

Pulls run ``apptainer pull`` through :mod:`lmrunner.runner` (timeout, an environment of their
own, the engine's stderr in the error); docs/backends/apptainer.md says why not spython.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from lmrunner import runner
from lmrunner.backends.apptainer.argv import HOST_PATH
from lmrunner.backends.apptainer.paths import NAME
from lmrunner.backends.base import MachineSpec
from lmrunner.errors import CommandError, LmrunnerError, SpecError, StartError

LOG = logging.getLogger(__name__)

#: Image references pulled into the image cache before the LM starts.
PULL_SCHEMES = ("docker://", "oras://")
PULL_TIMEOUT = 900.0


def is_registry_ref(image: str) -> bool:
    """Whether ``image`` names a registry image (pulled) rather than a local path."""
    return image.startswith(PULL_SCHEMES)


def local_image(spec: MachineSpec) -> Path:
    """The local image. The core resolved a relative name in the machinetype's files folder
    (:func:`lmrunner.spec.image`, the one rule for every backend): a name still relative was
    not found there.

    Raises:
        SpecError: the image is not a file or folder lmrunner found.
    """
    image = Path(spec.image)
    if not image.is_absolute():
        raise SpecError(
            f"{NAME}: machinetype {spec.machinetype}: image {spec.image!r} is neither in its "
            "files folder nor an absolute path"
        )
    return image


def resolve(
    spec: MachineSpec,
    binary: str,
    *,
    state_dir: Path,
    run: Callable[..., runner.Completed],
) -> Path:
    """The image to run: a local path, or a registry ref pulled once into the cache
    (``<state_dir>/images``; ``state_dir`` is the backend's own).

    Raises:
        StartError: the reference is not in the cache and cannot be pulled.
    """
    if not is_registry_ref(spec.image):
        return local_image(spec)
    cache = state_dir / "images"
    target = cache / (hashlib.sha256(spec.image.encode()).hexdigest()[:32] + ".sif")
    if target.is_file():
        return target
    partial = cache / f".{target.name}.{os.getpid()}.part"
    LOG.info("apptainer: pulling %s", spec.image)
    try:
        # 0755/0644: readable by sc_user, writable only by the daemon (no LM can alter it).
        cache.mkdir(mode=0o755, parents=True, exist_ok=True)
        state_dir.chmod(0o755)
        layers = str(cache / "layers")
        run(
            [binary, "--quiet", "pull", "--force", partial, spec.image],
            timeout=PULL_TIMEOUT,
            env={"PATH": HOST_PATH, "HOME": str(cache), "LANG": "C",
                 "APPTAINER_CACHEDIR": layers, "SINGULARITY_CACHEDIR": layers},
        )  # fmt: skip
        partial.chmod(0o644)
        partial.replace(target)
    except (LmrunnerError, OSError) as err:
        partial.unlink(missing_ok=True)
        detail = err.stderr.strip() if isinstance(err, CommandError) and err.stderr else err
        raise StartError(
            NAME,
            f"image {spec.image} is not here and cannot be pulled (no registry reachable?): "
            f"{detail}",
        ) from err
    return target
