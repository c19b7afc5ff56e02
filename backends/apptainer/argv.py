"""The ``apptainer exec`` command line of an LM, its env file and the engine process's environment.

The environment given with ``--env``/``--env-file`` is injected by apptainer's action script
right after the image's ``/.singularity.d/env/99-base.sh``; an image with a
``/.singularity.d/env`` folder but no such file silently gets none of it. For such directory
images an empty file is bound there (:func:`needs_env_hook`).
"""

from __future__ import annotations

import pwd
import re
import shlex
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

from lmrunner.backends.apptainer.paths import LmPaths
from lmrunner.backends.base import MachineSpec

#: Where apptainer injects the --env/--env-file variables (see the module docstring).
ENV_HOOK = PurePosixPath("/.singularity.d/env/99-base.sh")
HOST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def build_argv(
    binary: str, spec: MachineSpec, image: Path, paths: LmPaths, *, hook: Path | None
) -> list[str]:
    """The ``apptainer exec`` command line of an LM (Vac's, vac.md §4.3, plus isolation)."""
    argv = [
        binary, "--quiet", "exec",
        "--contain", "--pid", "--ipc", "--cleanenv", "--no-eval",
        "--hostname", spec.name,
        "--workdir", str(paths.workdir), "--pwd", "/tmp",
        "--env-file", str(paths.env_file),
    ]  # fmt: skip
    for mount in spec.mounts:
        mode = "ro" if mount.read_only else "rw"
        argv += ["--bind", f"{mount.source}:{mount.target}:{mode}"]
    if hook is not None:
        argv += ["--bind", f"{hook}:{ENV_HOOK}:ro"]
    return [*argv, str(image), *spec.command]


def env_file_text(env: Mapping[str, str]) -> str:
    """An ``--env-file``: one ``KEY='value'`` per line (shell quoting; ``--no-eval`` keeps the
    value literal)."""
    return "".join(f"{key}={shlex.quote(value)}\n" for key, value in sorted(env.items()))


def needs_env_hook(image: Path) -> bool:
    """Whether a directory image drops --env/--env-file variables without an env hook file."""
    env_dir = image / ".singularity.d" / "env"
    return image.is_dir() and env_dir.is_dir() and not (env_dir / ENV_HOOK.name).exists()


def process_env(binary: str, spec: MachineSpec, paths: LmPaths) -> dict[str, str]:
    """The environment of the apptainer process itself (the container's is --cleanenv)."""
    try:
        home = pwd.getpwuid(spec.owner[0]).pw_dir
    except KeyError:
        home = str(paths.workdir)
    return {
        "PATH": f"{Path(binary).parent}:{HOST_PATH}",
        "HOME": home,
        "LANG": "C",
        "APPTAINER_TMPDIR": str(paths.tmpdir),
        "SINGULARITY_TMPDIR": str(paths.tmpdir),
        "APPTAINER_CACHEDIR": str(paths.tmpdir / "cache"),
        "SINGULARITY_CACHEDIR": str(paths.tmpdir / "cache"),
    }
