"""Vac's VM metadata service on real QEMU: payloads written for Vac's VMs run unchanged.

The payload is written the way DIRAC's ``user_data_vm`` is: it takes ``$MACHINEFEATURES``,
``$JOBFEATURES`` and ``$JOBOUTPUTS`` from the ``##user_data_*_url##`` substitutions, reads MJF
keys and its metadata with ``curl`` over HTTP, and uploads its heartbeat and shutdown_message
with ``curl --upload-file`` (HTTP PUT). The guest is vcbusybox with the host's own ``curl`` added
as a second initramfs archive (the kernel unpacks both), so the client is the real one.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lmrunner.config import Config
from lmrunner.factory import Factory
from lmrunner.lifecycle import OutcomeSource
from tests.integration.conftest import Factories, drive
from tests.integration.test_vm_backend import BOOT_TIMEOUT, make_config, no_qemu_left

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

DIRAC_LIKE = r"""#!/bin/sh
# As DIRAC's user_data_vm: the VM lifecycle manager substitutes these.
export MACHINEFEATURES='##user_data_machinefeatures_url##'
export JOBFEATURES='##user_data_jobfeatures_url##'
export JOBOUTPUTS='##user_data_joboutputs_url##'
mkdir -p /tmp/out && cd /tmp/out
beat() { date +%s > heartbeat; curl -sf --upload-file heartbeat "$JOBOUTPUTS/heartbeat"; }
beat
cpus=$(curl -sf "$MACHINEFEATURES/total_cpu")
wall=$(curl -sf "$JOBFEATURES/wall_limit_secs")
id=$(curl -sf http://169.254.169.254/latest/meta-data/instance-id)
meta=http://169.254.169.254/openstack/latest/meta_data.json
name=$(curl -sf "$meta" | sed -n 's/.*"hostname": "\([^"]*\)".*/\1/p')
ud=$(curl -sf http://169.254.169.254/latest/user-data | sed -n 3p)
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
up=$(code "$MACHINEFEATURES/../metadata.json")
up2=$(code --path-as-is "$JOBFEATURES/../../../etc/passwd")
escape=$(code --path-as-is --upload-file heartbeat "$JOBOUTPUTS/../escaped")
echo "cpus=$cpus wall=$wall id=$id name=$name ud=$ud up=$up up2=$up2 escape=$escape" > seen
curl -sf --upload-file seen "$JOBOUTPUTS/seen"
head -c 3000000 /dev/zero > big   # curl sends Expect: 100-continue above 1 MiB
curl -sf --upload-file big "$JOBOUTPUTS/big"
i=0
while [ $i -lt ##BEATS## ]; do beat; sleep 2; i=$((i + 1)); done
echo "200 Intended work completed ok" > shutdown_message
curl -sf --upload-file shutdown_message "$JOBOUTPUTS/shutdown_message"
"""


@pytest.fixture(scope="module")
def curl_initrd(vm_artefacts: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vcbusybox's initramfs, then a second archive with /usr/bin/curl and its libraries."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed: run scripts/bootstrap")
    out = tmp_path_factory.mktemp("curl-initrd")
    tree = out / "tree"
    libraries = re.findall(r"(/\S+) \(0x", subprocess.run(
        ["ldd", curl], check=True, capture_output=True, text=True).stdout)  # fmt: skip
    for source in [curl, *libraries]:
        target = tree / source.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(source), target)
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    listing = "\n".join(names).encode()
    cpio = ["busybox", "cpio", "-o", "-H", "newc"]
    archive = subprocess.run(cpio, cwd=tree, check=True, input=listing, capture_output=True).stdout
    initrd = out / "initramfs-curl.cpio.gz"
    initrd.write_bytes(vm_artefacts[1].read_bytes() + gzip.compress(archive, 1))
    return initrd


@pytest.fixture
def site_dir() -> Iterator[Path]:
    """A 0755 folder outside pytest's 0700 tree: QEMU's account runs the metadata service."""
    top = Path(tempfile.mkdtemp(prefix="lmrunner-vm-metadata-"))
    top.chmod(0o755)
    yield top
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def factory_of(qemu: str, sc_user: str) -> Iterator[Callable[[Config], Factory]]:
    factories = Factories("vm", after_remove=no_qemu_left, idle_wait_seconds=0.5)
    yield factories.make
    factories.close()


def _config(tmp_path: Path, vm_artefacts: tuple[Path, Path], initrd: Path, script: str,
            processors: int = 1) -> Config:  # fmt: skip
    config = make_config(
        tmp_path,
        vm_artefacts,
        script,
        vm_initrd=str(initrd),
        heartbeat_file="heartbeat",
        heartbeat_seconds=20,
        fizzle_seconds=10,  # Vac's rule: the heartbeat is enforced once fizzle_seconds passed
        disk_gb_per_processor=0,
    )
    if processors == 1:
        return config
    from dataclasses import replace

    return replace(config, factory=replace(config.factory, total_processors=processors))


def test_a_dirac_style_vm_payload_heartbeats_over_http_and_ends_200(
    site_dir: Path,
    vm_artefacts: tuple[Path, Path],
    curl_initrd: Path,
    factory_of: Callable[[Config], Factory],
) -> None:
    """Two LMs at once: each reads its own MJF and metadata over HTTP, PUTs its heartbeat for
    longer than heartbeat_seconds and its shutdown_message, and ends 200; neither reaches the
    other's data or anything outside its own folder."""
    script = DIRAC_LIKE.replace("##BEATS##", "14")
    factory = factory_of(_config(site_dir, vm_artefacts, curl_initrd, script, processors=2))
    drive(factory, lambda: len(factory.store.recent()) == 2, BOOT_TIMEOUT)
    factory.store.set_meta("draining", "1")
    lms = factory.store.recent()
    drive(factory, lambda: not any(lm.active for lm in factory.store.recent()), 3 * BOOT_TIMEOUT)
    for lm in factory.store.recent():
        other = next(x for x in lms if x.uuid != lm.uuid)
        assert lm.outcome is not None
        assert (lm.outcome.code, lm.outcome.source) == (200, OutcomeSource.PAYLOAD), lm.outcome
        joboutputs = lm.directory / "joboutputs"
        seen = (joboutputs / "seen").read_text()
        assert f"id={lm.uuid} name={lm.name} " in seen, seen
        assert "cpus=1 " in seen and "ud=export MACHINEFEATURES='http://169.254.169.253/" in seen
        assert "up=404 up2=404 escape=403" in seen, seen
        assert other.uuid not in seen
        assert (joboutputs / "big").stat().st_size == 3000000
        assert not (lm.directory / "escaped").exists()
        assert not [p for p in joboutputs.iterdir() if p.name.startswith(".lmrunner-")]


def test_a_vm_that_stops_putting_its_heartbeat_is_stopped_700(
    site_dir: Path,
    vm_artefacts: tuple[Path, Path],
    curl_initrd: Path,
    factory_of: Callable[[Config], Factory],
) -> None:
    """The heartbeat PUT over HTTP is what the factory enforces: without it the LM is ended."""
    script = DIRAC_LIKE.replace("##BEATS##", "0").replace(
        'echo "200 Intended', 'sleep 600\necho "200 Intended'
    )
    factory = factory_of(_config(site_dir, vm_artefacts, curl_initrd, script))
    drive(factory, lambda: bool(factory.store.recent()), BOOT_TIMEOUT)
    factory.store.set_meta("draining", "1")
    drive(factory, lambda: not factory.store.recent()[0].active, 3 * BOOT_TIMEOUT)
    lm = factory.store.recent()[0]
    assert (lm.directory / "joboutputs" / "heartbeat").exists()
    assert lm.outcome is not None and lm.outcome.code == 700, lm.outcome
    assert "eartbeat" in lm.outcome.text
