"""Apptainer/Singularity-container logical machines (SC).

For now only the placement of an LM's files, which payloads depend on (Vac's, vac.md §4.5):
``--contain`` gives the container a private /tmp, where Vac bound the LM's folders.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from lmrunner.model import Placement

PLACEMENT = Placement(
    user_data=PurePosixPath("/user_data"),
    machinefeatures=PurePosixPath("/tmp/machinefeatures"),
    jobfeatures=PurePosixPath("/tmp/jobfeatures"),
    joboutputs=PurePosixPath("/tmp/joboutputs"),
)
