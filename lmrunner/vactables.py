"""Vac's names for lmrunner's options and machine models, the Vac options lmrunner does not
carry, and those it accepts without acting on them: shared by the Vac importer
(:mod:`lmrunner.vacconf`), Vacuum Pipes (:mod:`lmrunner.pipes`), `lmrunner check` and the
configuration reference."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmrunner.config import BackendName, Config, FactoryConfig, MachinetypeConfig
from lmrunner.schema import fields_of, info_of, unsupported_values

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
    "hs06_per_machine": "ignored by Vac 03 too; use hs06_per_processor",
    "cycle_seconds": "ignored by Vac too (obsolete)",
    "log_machineoutputs": "obsolete, ignored by Vac too; machines_dir_days sets how long an LM's "
    "directory (joboutputs included) is kept",
}

#: Vac options of a machinetype (or vacuum_pipe) section lmrunner does not carry, and why.
VAC_MACHINETYPE_NOT_CARRIED: Mapping[str, str] = {
    "rootpublickey": "ignored by Vac 03 in a machinetype section (it asked for root_public_key "
    "in [settings]); lmrunner offers factory.root_public_key to every VM",
    "root_public_key": "ignored by Vac 03 in a machinetype section (it asked for "
    "root_public_key in [settings]); lmrunner offers factory.root_public_key to every VM",
}

#: Old Vac spellings the schema's ``vac`` names leave out (the importer maps them, pipes do not):
#: section class -> {old name: lmrunner field}.
VAC_OLD_NAMES: Mapping[type[Any], Mapping[str, str]] = {
    FactoryConfig: {"rootpublickey": "root_public_key"},
    # Vac before user_data_proxy: the proxy's certificate and key (Vac 03 ignored them).
    MachinetypeConfig: {"user_data_proxy_cert": "x509_cert", "user_data_proxy_key": "x509_key"},
}


def unsupported_options(config: Config) -> list[tuple[str, str, str]]:
    """(path, option, reason) of every option ``config`` sets that lmrunner does not act on.

    Covers the factory, every machinetype (pipe types included) and every pipe's overrides; an
    option holding its default is not listed (that is what lmrunner does anyway). The reasons
    are the options' ``unsupported`` texts ("not supported by lmrunner: ...", "not supported
    yet: ...").
    """
    out = unsupported_values(config.factory, "factory")
    for name, mt in config.machinetypes.items():
        out += unsupported_values(mt, f"machinetypes.{name}")
    marked = {
        f.name: (info_of(f).unsupported, f.default)
        for f, _hint in fields_of(MachinetypeConfig)
        if info_of(f).unsupported
    }
    for name, pipe in config.pipes.items():
        for key, value in pipe.overrides.items():
            if key in marked and value not in (marked[key][1], None):
                out.append((f"vacuum_pipes.{name}.overrides", key, marked[key][0]))
    return out
