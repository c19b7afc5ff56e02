"""vm/kernel.py: the PVH-bootable ELF inside a bzImage, found, checked, unpacked and cached.

Synthetic bzImages (``kernels.py``) stand in for real kernels; the real Debian kernel is
unpacked and booted by the VM integration tests.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from lmrunner.backends.vm import kernel as vm_kernel
from lmrunner.backends.vm.kernel import KernelCache, KernelError
from lmrunner.model import Handle
from tests.unit.backends.kernels import PLAIN_ELF, PVH_ELF, PVH_NOTE, bzimage, elf, note

COMPRESSIONS: dict[str, Callable[[bytes], bytes]] = {
    "xz": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
    "gzip": gzip.compress,
    "bzip2": bz2.compress,
    "lzma": lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE),
    "none": lambda data: data,
}


@pytest.mark.parametrize("name", sorted(COMPRESSIONS))
def test_every_compression_python_reads_unpacks_to_the_elf(name: str) -> None:
    image = bzimage(COMPRESSIONS[name](PVH_ELF))
    assert vm_kernel.payload(image)[0] == name
    unpacked = vm_kernel.unpack(image)
    # The size the build appends after the stream is not part of the kernel (an uncompressed
    # payload keeps it: nothing marks where the ELF ends, and QEMU reads only what it describes).
    assert unpacked == PVH_ELF if name != "none" else unpacked.startswith(PVH_ELF)


@pytest.mark.parametrize("name", ["xz", "gzip", "bzip2", "lzma"])
def test_a_cut_stream_is_refused_not_unpacked_in_part(name: str) -> None:
    stream = COMPRESSIONS[name](PVH_ELF + os.urandom(65536))
    with pytest.raises(KernelError, match="payload ends before its stream does"):
        vm_kernel.unpack(bzimage(stream[: len(stream) // 2]))


def test_setup_sectors_zero_means_four() -> None:
    image = bytearray(bzimage(gzip.compress(PVH_ELF), setup_sects=4))
    image[0x1F1] = 0
    assert vm_kernel.unpack(bytes(image)) == PVH_ELF


def test_the_pvh_note_is_what_makes_an_elf_bootable() -> None:
    assert vm_kernel.has_pvh_entry(PVH_ELF)
    assert not vm_kernel.has_pvh_entry(PLAIN_ELF)
    assert not vm_kernel.has_pvh_entry(elf(PVH_NOTE, bits=1))  # 32-bit
    assert not vm_kernel.has_pvh_entry(elf(PVH_NOTE, machine=183))  # aarch64
    assert not vm_kernel.has_pvh_entry(b"\x7fELF")
    assert not vm_kernel.has_pvh_entry(PVH_ELF[:100])  # program headers cut off


def test_notes_in_an_8_aligned_segment_are_walked_with_8_byte_padding() -> None:
    first = note(b"GNU", 5, b"\x01\x02\x03\x04\x05", align=8)  # padded to 8: 4 would misread
    assert vm_kernel.has_pvh_entry(elf(first + note(b"Xen", 18, b"\x00" * 4, align=8), align=8))


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (b"MZ" + b"\x00" * 1000, "not a Linux bzImage"),
        (bzimage(gzip.compress(PVH_ELF), protocol=0x207), "boot protocol 2.7"),
        (bzimage(b"\x28\xb5\x2f\xfd" + b"zstd"), "unknown kernel compression (magic 28b52ffd)"),
        (bzimage(gzip.compress(PLAIN_ELF)), "no PVH entry point"),
        (bzimage(b"\xfd7zXZ\x00 broken"), "the xz payload does not decompress"),
    ],
)
def test_kernels_that_cannot_boot_directly_say_why(image: bytes, reason: str) -> None:
    with pytest.raises(KernelError, match=re.escape(reason)):
        vm_kernel.unpack(image)


def test_a_payload_outside_the_file_is_refused() -> None:
    image = bytearray(bzimage(gzip.compress(PVH_ELF)))
    struct.pack_into("<I", image, 0x24C, len(image))
    with pytest.raises(KernelError, match="outside the file"):
        vm_kernel.unpack(bytes(image))


def cache_name(image: Path) -> str:
    return f"{hashlib.sha256(image.read_bytes()).hexdigest()}.{vm_kernel.FORMAT}.elf"


def test_the_cache_names_the_elf_by_the_bzimage_and_writes_it_once(tmp_path: Path) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(bzimage(gzip.compress(PVH_ELF)))
    cache = tmp_path / "kernels"
    first = vm_kernel.cached(image, cache)
    assert first == cache / cache_name(image)
    assert first.read_bytes() == PVH_ELF
    assert first.stat().st_mode & 0o777 == 0o644
    written = first.stat().st_ino
    assert vm_kernel.cached(image, cache) == first
    assert first.stat().st_ino == written  # found, not written again
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temporary left

    image.write_bytes(bzimage(bz2.compress(PVH_ELF)))  # a new kernel: a new file
    assert vm_kernel.cached(image, cache) != first


@pytest.mark.parametrize("content", [b"", PVH_ELF[:200], PLAIN_ELF])
def test_a_torn_or_foreign_cache_file_is_unpacked_again(tmp_path: Path, content: bytes) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(bzimage(gzip.compress(PVH_ELF)))
    cache = tmp_path / "kernels"
    cache.mkdir()
    (cache / cache_name(image)).write_bytes(content)  # as a crash or an old unpacker left it
    assert vm_kernel.cached(image, cache).read_bytes() == PVH_ELF


def test_an_oversized_image_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(bzimage(gzip.compress(PVH_ELF)))
    monkeypatch.setattr(vm_kernel, "MAX_IMAGE_BYTES", 100)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read"))
    with pytest.raises(KernelError, match="larger than"):
        vm_kernel.cached(image, tmp_path / "kernels")


def test_kernels_unused_for_long_and_abandoned_temporaries_are_pruned(tmp_path: Path) -> None:
    cache = tmp_path / "kernels"
    cache.mkdir()
    names = ("old.v1.elf", "recent.v1.elf", "kept.v1.elf", ".x.v1.elf.ab12", ".y.v1.elf.cd34")
    old, recent, kept, abandoned, writing = (cache / name for name in names)
    for path in (old, recent, kept, abandoned, writing):
        path.write_bytes(b"elf")
    for path in (old, kept, abandoned):
        os.utime(path, (1000.0, 1000.0))
    other = cache / "notes.txt"
    other.write_text("not a kernel")
    os.utime(other, (1000.0, 1000.0))
    removed = vm_kernel.prune(cache, {kept}, older_than=2000.0)
    assert sorted(removed) == sorted([old, abandoned])
    left = sorted(p.name for p in cache.iterdir())
    assert left == [".y.v1.elf.cd34", "kept.v1.elf", "notes.txt", "recent.v1.elf"]


def test_a_hit_marks_the_kernel_as_used(tmp_path: Path) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(bzimage(gzip.compress(PVH_ELF)))
    found = vm_kernel.cached(image, tmp_path / "kernels")
    os.utime(found, (1000.0, 1000.0))
    vm_kernel.cached(image, tmp_path / "kernels")
    assert found.stat().st_mtime > 1000.0


def test_the_factory_cache_remembers_kernels_by_stat_and_failures_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.write_bytes(bzimage(gzip.compress(PVH_ELF)))
    bad.write_bytes(bzimage(gzip.compress(PLAIN_ELF)))
    calls: list[Path] = []
    real = vm_kernel.cached

    def counting(image: Path, cache_dir: Path) -> Path:
        calls.append(image)
        return real(image, cache_dir)

    monkeypatch.setattr(vm_kernel, "cached", counting)
    cache = KernelCache(tmp_path / "kernels")
    assert cache.get(good) == cache.get(good)
    for _ in range(2):
        with pytest.raises(KernelError, match="no PVH entry"):
            cache.get(bad)
    assert calls == [good, bad]
    good.write_bytes(bzimage(bz2.compress(PVH_ELF)))  # replaced in place: read again
    cache.get(good)
    assert calls == [good, bad, good]
    with pytest.raises(KernelError, match="cannot read"):
        cache.get(tmp_path / "missing")


def test_a_cache_that_cannot_be_written_is_retried_later_not_at_every_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(bzimage(gzip.compress(PVH_ELF)))
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    cache = KernelCache(blocked / "kernels")
    clock = [1_000_000.0]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    calls: list[Path] = []
    real = vm_kernel.cached

    def counting(image: Path, cache_dir: Path) -> Path:
        calls.append(image)
        return real(image, cache_dir)

    monkeypatch.setattr(vm_kernel, "cached", counting)
    for _ in range(3):
        with pytest.raises(KernelError, match="cannot unpack"):
            cache.get(image)
    assert calls == [image]  # remembered: starts meanwhile boot the bzImage at once
    blocked.unlink()
    clock[0] += vm_kernel.RETRY_SECONDS
    assert cache.get(image).read_bytes() == PVH_ELF
    assert calls == [image, image]


def test_a_handle_keeps_its_engine_facts_and_reads_old_handles() -> None:
    handle = Handle(1, {"pid": 7}, {"accel": "tcg"})
    assert Handle.from_json(handle.to_json()) == handle
    assert Handle.from_json({"version": 1, "data": {"pid": 7}}) == Handle(1, {"pid": 7})
    assert "engine" not in Handle(1, {}).to_json()


@pytest.mark.allow_subprocess
def test_the_daemon_unpacks_in_a_child(tmp_path: Path) -> None:
    """The xz decoder's dictionary stays out of the daemon's memory: the child does the work
    and names the cached kernel; a kernel that cannot be unpacked is a KernelError."""
    image = tmp_path / "vmlinuz"
    image.write_bytes(bzimage(gzip.compress(PVH_ELF)))
    cache = tmp_path / "kernels"
    found = vm_kernel.unpack_in_child(image, cache)
    assert found == cache / cache_name(image)
    assert found.read_bytes() == PVH_ELF
    bad = tmp_path / "not-a-kernel"
    bad.write_bytes(b"nothing bootable here" * 100)
    with pytest.raises(KernelError, match="bzImage"):
        vm_kernel.unpack_in_child(bad, cache)
