"""Docker-container logical machines (DC).

For now only the placement of an LM's files, which payloads depend on (Vac's, vac.md §4.5);
the backend itself arrives with the Docker backend issue.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from lmrunner.model import Placement

PLACEMENT = Placement(
    user_data=PurePosixPath("/user_data"),
    machinefeatures=PurePosixPath("/etc/machinefeatures"),
    jobfeatures=PurePosixPath("/etc/jobfeatures"),
    joboutputs=PurePosixPath("/var/spool/joboutputs"),
)
