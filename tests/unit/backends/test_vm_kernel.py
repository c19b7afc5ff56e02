"""vm_kernel: the PVH-bootable ELF inside a bzImage, found, checked, unpacked and cached.

Synthetic bzImages (a boot-protocol header and a compressed ELF) stand in for real kernels; the
real Debian kernel is unpacked and booted by the VM integration tests.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from lmrunner.backends import vm_kernel
from lmrunner.backends.vm_kernel import KernelCache, KernelError
from lmrunner.model import Handle


def note(name: bytes, n_type: int, desc: bytes) -> bytes:
    def pad(data: bytes) -> bytes:
        return data + b"\x00" * (-len(data) % 4)

    return struct.pack("<III", len(name) + 1, len(desc), n_type) + pad(name + b"\x00") + pad(desc)


def elf(notes: bytes, *, bits: int = 2) -> bytes:
    """A minimal ELF64 little-endian file: one PT_LOAD (ignored) and one PT_NOTE."""
    phoff, phentsize, phnum = 64, 56, 2
    notes_at = phoff + phentsize * phnum
    header = bytearray(64)
    header[:6] = b"\x7fELF" + bytes([bits, 1])
    struct.pack_into("<Q", header, 0x20, phoff)
    struct.pack_into("<HH", header, 0x36, phentsize, phnum)
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, 0, 0, 0)
    pt_note = struct.pack("<IIQQQQQQ", 4, 4, notes_at, 0, 0, len(notes), len(notes), 4)
    return bytes(header) + load + pt_note + notes


PVH_ELF = elf(note(b"GNU", 3, b"build-id") + note(b"Xen", 18, struct.pack("<I", 0x1000000)))
PLAIN_ELF = elf(note(b"Xen", 6, b"linux\x00"))


def bzimage(payload: bytes, *, protocol: int = 0x20F, setup_sects: int = 3) -> bytes:
    """A bzImage: setup sectors with the header, then the protected-mode part holding a
    (stand-in) decompressor before the payload, then the kernel's size, as the build makes it."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, protocol)
    decompressor = b"\x90" * 100
    struct.pack_into("<II", setup, 0x248, len(decompressor), len(payload))
    return bytes(setup) + decompressor + payload + struct.pack("<I", 12345)


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
    assert vm_kernel.unpack(image) == PVH_ELF


def test_setup_sectors_zero_means_four() -> None:
    image = bytearray(bzimage(gzip.compress(PVH_ELF), setup_sects=4))
    image[0x1F1] = 0
    assert vm_kernel.unpack(bytes(image)) == PVH_ELF


def test_the_pvh_note_is_what_makes_an_elf_bootable() -> None:
    assert vm_kernel.has_pvh_entry(PVH_ELF)
    assert not vm_kernel.has_pvh_entry(PLAIN_ELF)
    assert not vm_kernel.has_pvh_entry(elf(note(b"Xen", 18, b"1234"), bits=1))  # 32-bit
    assert not vm_kernel.has_pvh_entry(b"\x7fELF")
    assert not vm_kernel.has_pvh_entry(PVH_ELF[:100])  # program headers cut off


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
    with pytest.raises(KernelError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        vm_kernel.unpack(image)


def test_a_payload_outside_the_file_is_refused() -> None:
    image = bytearray(bzimage(gzip.compress(PVH_ELF)))
    struct.pack_into("<I", image, 0x24C, len(image))
    with pytest.raises(KernelError, match="outside the file"):
        vm_kernel.unpack(bytes(image))


def test_the_cache_names_the_elf_by_the_bzimage_and_writes_it_once(tmp_path: Path) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(bzimage(gzip.compress(PVH_ELF)))
    cache = tmp_path / "kernels"
    first = vm_kernel.cached(image, cache)
    assert first == cache / f"{hashlib.sha256(image.read_bytes()).hexdigest()}.elf"
    assert first.read_bytes() == PVH_ELF
    assert first.stat().st_mode & 0o777 == 0o644  # QEMU reads it
    written = first.stat().st_ino
    assert vm_kernel.cached(image, cache) == first
    assert first.stat().st_ino == written  # found, not written again
    assert [p.name for p in cache.iterdir()] == [first.name]  # no temporary left

    image.write_bytes(bzimage(bz2.compress(PVH_ELF)))  # a new kernel: a new file
    assert vm_kernel.cached(image, cache) != first


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


def test_kernels_unused_for_long_are_pruned_but_not_those_in_use(tmp_path: Path) -> None:
    cache = tmp_path / "kernels"
    cache.mkdir()
    old, recent, kept = (cache / f"{name}.elf" for name in ("old", "recent", "kept"))
    for path in (old, recent, kept):
        path.write_bytes(b"elf")
    os.utime(old, (1000.0, 1000.0))
    os.utime(kept, (1000.0, 1000.0))
    other = cache / "notes.txt"
    other.write_text("not a kernel")
    os.utime(other, (1000.0, 1000.0))
    assert vm_kernel.prune(cache, {kept}, older_than=2000.0) == [old]
    assert sorted(p.name for p in cache.iterdir()) == ["kept.elf", "notes.txt", "recent.elf"]


def test_a_hit_marks_the_kernel_as_used(tmp_path: Path) -> None:
    image = tmp_path / "vmlinuz"
    image.write_bytes(bzimage(gzip.compress(PVH_ELF)))
    found = vm_kernel.cached(image, tmp_path / "kernels")
    os.utime(found, (1000.0, 1000.0))
    vm_kernel.cached(image, tmp_path / "kernels")
    assert found.stat().st_mtime > 1000.0


def test_a_handle_keeps_its_engine_facts_and_reads_old_handles() -> None:
    handle = Handle(1, {"pid": 7}, {"accel": "tcg"})
    assert Handle.from_json(handle.to_json()) == handle
    assert Handle.from_json({"version": 1, "data": {"pid": 7}}) == Handle(1, {"pid": 7})
    assert "engine" not in Handle(1, {}).to_json()
