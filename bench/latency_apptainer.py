"""Apptainer side of ``bench/start_latency.py``: the vcbusybox sandbox through a bare ``apptainer
exec`` as ``sc_user``.

Raw: ``apptainer exec`` of the same sandbox directory running the same payload, started with the
same drop to the unprivileged account that lmrunner uses (setgroups/setgid/setuid in the forked
child; ``runuser`` would add PAM's start-up to the raw side), with only what the payload needs:
its joboutputs folder bound at ``$JOBOUTPUTS``. lmrunner adds ``--contain --pid --ipc --cleanenv
--no-eval --hostname --workdir --env-file``, Vac's other binds, the LM's cgroup and the factory
pass around it.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path
from typing import Any

from latency_common import UPTIME_PAYLOAD, boottime, uptime_in_file

from lmrunner.backends.apptainer import PLACEMENT

REPO = Path(__file__).resolve().parents[1]
VCBUSYBOX_OUT = Path(os.environ.get("VCBUSYBOX_OUT", REPO / "build" / "vcbusybox"))
IMAGE = VCBUSYBOX_OUT / "apptainer" / "vcbusybox"  # the sandbox directory (no unpacking)
SC_USER = os.environ.get("LMRUNNER_BENCH_SC_USER", "lmrunner-sc")
PAYLOAD = UPTIME_PAYLOAD
first_seen = uptime_in_file


def machinetype(folder: Path, user_data: Path) -> dict[str, Any]:
    # The LMs run as sc_user: the bench's temporary folder (0700) must let it reach them.
    folder.chmod(0o755)
    return {"backend": "apptainer", "image": str(IMAGE), "user_data": str(user_data)}


def raw_run(folder: Path) -> float:
    """A bare ``apptainer exec`` of the same image and payload, as sc_user."""
    account = pwd.getpwnam(SC_USER)
    out = folder / "raw"
    out.mkdir(parents=True)
    os.chown(out, account.pw_uid, account.pw_gid)
    folder.chmod(0o755)
    payload = folder / "raw-user_data"
    if not payload.exists():
        payload.write_text(PAYLOAD)
        payload.chmod(0o755)

    def drop() -> None:
        os.setgroups([])
        os.setgid(account.pw_gid)
        os.setuid(account.pw_uid)

    argv = [
        "apptainer", "--quiet", "exec",
        "--bind", f"{out}:{PLACEMENT.joboutputs}", "--bind", f"{payload}:/user_data:ro",
        str(IMAGE), "/user_data",
    ]  # fmt: skip
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": account.pw_dir,
        "LANG": "C",
        "JOBOUTPUTS": str(PLACEMENT.joboutputs),  # without --cleanenv it passes into the LM
    }
    started = boottime()
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        preexec_fn=drop,
        start_new_session=True,
    )
    seen = first_seen(out / "first")
    proc.wait(timeout=60)
    return seen - started
