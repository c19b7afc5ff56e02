"""The config drive of a VM LM: how cloud images (cloud-init, CernVM, vcbusybox) get user_data.

An ISO 9660 image with volume label ``config-2`` (OpenStack's config drive), Rock Ridge and Joliet
so names keep their case, holding the same data twice:

- ``openstack/latest/user_data`` and ``openstack/latest/meta_data.json`` (uuid, hostname, name,
  availability_zone, launch_index, public_keys, and ``meta`` with the machinetype and where the
  LM's machine/job features and joboutputs are inside the guest);
- ``ec2/latest/user-data`` and ``ec2/latest/meta-data.json`` (instance-id, hostnames, placement,
  public-keys), which cloud-init's config-drive reader also takes.

Vac served the same data over HTTP from 169.254.169.254 (vac.md §4.1); a drive needs no network,
no metadata server and no per-LM address. It is built by a standard tool (``genisoimage``, else
``xorriso -as mkisofs``), never by hand.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmrunner import runner
from lmrunner.errors import CommandError, LmrunnerError

VOLUME_LABEL = "config-2"
#: The tools that can write the drive, best first: genisoimage takes ~5 ms, xorriso ~100 ms (its
#: writer thread is polled every 0.1 s), which counts on every LM start.
ISO_TOOLS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("genisoimage", ()),
    ("xorriso", ("-as", "mkisofs")),
)
TOOL_TIMEOUT = 60.0


class DriveError(LmrunnerError):
    """The config drive could not be written (the tool is missing or failed)."""


@dataclass(frozen=True, slots=True)
class DriveData:
    """What goes onto one LM's config drive."""

    uuid: str
    hostname: str
    user_data: bytes
    availability_zone: str
    #: OpenStack ``meta``: plain strings only (machinetype, MJF/joboutputs locations, mount tags)
    meta: Mapping[str, str]
    public_key: str | None = None


def iso_tool() -> list[str] | None:
    """The argv prefix of the first ISO writer found on PATH, or None when there is none."""
    for name, extra in ISO_TOOLS:
        found = shutil.which(name)
        if found is not None:
            return [found, *extra]
    return None


def openstack_metadata(data: DriveData) -> dict[str, Any]:
    """``openstack/latest/meta_data.json`` (cloud-init adds ``instance-id`` from ``uuid`` and
    ``local-hostname`` from ``hostname``)."""
    meta: dict[str, Any] = {
        "uuid": data.uuid,
        "hostname": data.hostname,
        "name": data.hostname,
        "availability_zone": data.availability_zone,
        "launch_index": 0,
        "meta": dict(data.meta),
    }
    if data.public_key:
        meta["public_keys"] = {"0": data.public_key}
    return meta


def ec2_metadata(data: DriveData) -> dict[str, Any]:
    """``ec2/latest/meta-data.json``: the same facts under EC2's names."""
    meta: dict[str, Any] = {
        "instance-id": data.uuid,
        "ami-id": data.uuid,
        "hostname": data.hostname,
        "local-hostname": data.hostname,
        "placement": {"availability-zone": data.availability_zone},
    }
    if data.public_key:
        meta["public-keys"] = {"0": {"openssh-key": data.public_key}}
    return meta


def write_tree(data: DriveData, root: Path) -> None:
    """Lay the drive's files out under ``root`` (which must not exist yet)."""
    openstack = root / "openstack" / "latest"
    ec2 = root / "ec2" / "latest"
    openstack.mkdir(parents=True)
    ec2.mkdir(parents=True)
    (openstack / "user_data").write_bytes(data.user_data)
    (openstack / "meta_data.json").write_text(json.dumps(openstack_metadata(data), indent=1))
    (ec2 / "user-data").write_bytes(data.user_data)
    (ec2 / "meta-data.json").write_text(json.dumps(ec2_metadata(data), indent=1))


def build(data: DriveData, output: Path, *, tool: list[str] | None = None) -> Path:
    """Write the config drive of ``data`` to ``output`` (an ISO 9660 image); returns ``output``.

    The file tree is staged beside ``output`` and removed afterwards.

    Raises:
        DriveError: no ISO tool is installed, or it failed.
    """
    argv = tool or iso_tool()
    if argv is None:
        names = " or ".join(name for name, _ in ISO_TOOLS)
        raise DriveError(f"no ISO 9660 writer found: install {names}")
    stage = output.with_name(output.name + ".tree")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        write_tree(data, stage)
        runner.run(
            [*argv, "-quiet", "-input-charset", "utf-8", "-V", VOLUME_LABEL, "-J", "-R",
             "-o", output, stage],
            timeout=TOOL_TIMEOUT,
        )  # fmt: skip
    except (CommandError, OSError) as err:
        with contextlib.suppress(OSError):  # the error to tell is the one above
            output.unlink(missing_ok=True)
        raise DriveError(f"cannot write the config drive {output}: {err}") from err
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return output
