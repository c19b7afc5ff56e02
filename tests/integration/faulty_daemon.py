"""``lmrunner`` with one fault injected, run as a process by tests/integration/test_faults.py.

    python -m tests.integration.faulty_daemon FAULT ARG [N] -- LMRUNNER-ARGUMENTS...

Faults:

- ``destroy-sleeps MARKER``: the Docker backend's ``destroy`` first writes the LM's uuid to
  MARKER, then sleeps 60 s, then destroys: the test kills the daemon inside an LM's ending.
- ``docker-errors RECORD N``: the Docker SDK's ``Container.remove`` and ``Container.kill`` raise
  ``docker.errors.APIError`` (status 500) the first N times each, as an engine in trouble
  would; each injected failure appends ``remove|kill <container id>`` to RECORD.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def destroy_sleeps(marker: Path) -> None:
    from lmrunner.backends.docker import DockerBackend

    real = DockerBackend.destroy

    def destroy(self: DockerBackend, uuid: str, handle: Any) -> None:
        marker.write_text(uuid)
        time.sleep(60)
        real(self, uuid, handle)

    DockerBackend.destroy = destroy  # type: ignore[method-assign]


def docker_errors(record: Path, times: int) -> None:
    import docker.errors
    import requests
    from docker.models.containers import Container

    lock = threading.Lock()
    calls = {"remove": 0, "kill": 0}

    def failing(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: Any, *args: Any, **kwargs: Any) -> Any:
            with lock:
                calls[name] += 1
                inject = calls[name] <= times
                if inject:
                    with record.open("a") as out:
                        out.write(f"{name} {self.id}\n")
            if inject:
                response = requests.Response()
                response.status_code = 500
                response.reason = "Internal Server Error"
                raise docker.errors.APIError(
                    "500 Server Error: injected", response=response, explanation="injected"
                )
            return real(self, *args, **kwargs)

        return call

    Container.remove = failing("remove", Container.remove)
    Container.kill = failing("kill", Container.kill)


def main(argv: Sequence[str]) -> int:
    split = list(argv).index("--")
    fault, arguments, lmrunner_argv = argv[0], argv[1:split], argv[split + 1 :]
    if fault == "destroy-sleeps":
        destroy_sleeps(Path(arguments[0]))
    elif fault == "docker-errors":
        docker_errors(Path(arguments[0]), int(arguments[1]))
    else:
        raise SystemExit(f"faulty_daemon: unknown fault {fault!r}")
    from lmrunner.cli import main as lmrunner_main

    return lmrunner_main(lmrunner_argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
