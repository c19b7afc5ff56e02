"""Vac's names for lmrunner's options and machine models, and the Vac options lmrunner does not
carry: shared by the Vac importer (:mod:`lmrunner.vacconf`), Vacuum Pipes (:mod:`lmrunner.pipes`)
and the configuration reference."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmrunner.config import BackendName
from lmrunner.schema import fields_of, info_of

#: Vac's machine_model values and the backend that runs them.
VAC_MODELS: Mapping[str, BackendName] = {
    "docker": BackendName.DOCKER,
    "singularity": BackendName.APPTAINER,
    "cernvm3": BackendName.VM,
    "cernvm4": BackendName.VM,
    "vm-raw": BackendName.VM,
}


def vac_names(cls: type[Any]) -> dict[str, str]:
    """Vac option names (and deprecated spellings) -> lmrunner field names of ``cls``.

    Families such as ``user_data_option_*`` map to their mapping field (``user_data_options``).
    """

    out: dict[str, str] = {}
    for f, _hint in fields_of(cls):
        for name in info_of(f).vac:
            out[name] = f.name
    return out


#: Vac options with no home in lmrunner, and why (shown by the reference and the importer).
VAC_NOT_CARRIED: Mapping[str, str] = {
    "volume_group": "lmrunner makes no LVM volumes; scratch is bounded by disk_gb_per_processor",
    "fix_networking": "lmrunner runs VMs with user-mode networking; there is no libvirt network",
    "forward_dev": "lmrunner runs VMs with user-mode networking; there is no libvirt network",
    "domain_type": "rejected by Vac too",
    "total_machines": "rejected by Vac too; use total_processors",
    "delete_old_files": "rejected by Vac too",
    "mb_per_machine": "ignored by Vac too; use mb_per_processor",
}
