"""Apptainer/Singularity-container logical machines (SC), as Vac ran them (vac.md §4.3).

One LM is one ``apptainer exec`` process, run as the factory's unprivileged ``sc_user`` (user
namespace mode, never root) and started through :mod:`lmrunner.process`: the child writes itself
into the LM's cgroup (created and limited by the core) before it executes anything, so the whole
container tree is held to the LM's limits, and an exit is pushed, not polled. The container gets
``--contain`` (private /tmp, /var/tmp and $HOME in a per-LM ``--workdir``), ``--pid`` (its
processes die with its init, none outlives the LM), ``--ipc``, the LM's hostname (``--hostname``:
a UTS namespace, which the user namespace makes available unprivileged), ``--cleanenv`` plus an
env file (nothing of the daemon's environment leaks in; ``--no-eval`` keeps values literal) and
Vac's binds (:data:`PLACEMENT`, placed by the core in ``spec.mounts``).

The files, by job (each module's docstring names the apptainer quirk it handles):

- ``driver``: :class:`ApptainerBackend`, the backend protocol; a handle's contents; signals.
- ``argv``: the ``apptainer exec`` command line, the env file (and env hook), the environment
  of the apptainer process.
- ``image``: local images and registry references pulled once into the image cache.
- ``validate``: what ``validate`` refuses, including paths the LM's account cannot reach.
- ``paths``: one LM's files (:class:`LmPaths`), their removal, the log's tail and FATAL line.
- ``orphans``: the labels in the LM's environment and the processes carrying them (psutil).
- ``version``: finding apptainer or singularity and checking its version.

Why spython is not used, and where psutil is: docs/backends/apptainer.md.
"""

from lmrunner.backends.apptainer.argv import build_argv, env_file_text, needs_env_hook
from lmrunner.backends.apptainer.driver import PLACEMENT, ApptainerBackend
from lmrunner.backends.apptainer.orphans import labels_in_environ
from lmrunner.backends.apptainer.paths import LmPaths
from lmrunner.backends.apptainer.version import parse_version

__all__ = [
    "PLACEMENT",
    "ApptainerBackend",
    "LmPaths",
    "build_argv",
    "env_file_text",
    "labels_in_environ",
    "needs_env_hook",
    "parse_version",
]
