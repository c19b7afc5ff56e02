"""Direct kernel boot: the uncompressed kernel inside a bzImage, booted through its PVH entry.

A bzImage is a small decompressor plus the compressed kernel. Under TCG (no KVM) the guest runs
that decompressor emulated: for Debian's xz-compressed kernel it is ~5 s of a ~10 s boot, paid
by every VM LM. Most distribution kernels (``CONFIG_PVH=y``) are also bootable as the plain ELF
``vmlinux`` through the PVH entry point, which QEMU (4.0 and later) starts directly. So the
backend decompresses each kernel once, on the host (~1 s), keeps the ELF in
``<state_dir>/vm/kernels/<sha256 of the bzImage>.elf`` and boots that (files unused for 30 days
are removed).

The ELF is used only when it carries the PVH note (Xen note type 18,
``XEN_ELFNOTE_PHYS32_ENTRY``); any other kernel, compression or surprise boots the bzImage as
given. What is lost: the guest's KASLR (the decompressor picks the random base), which matters
little for a short-lived single-tenant guest and is documented (``factory.vm_direct_kernel``).
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import lzma
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from lmrunner import atomic
from lmrunner.errors import LmrunnerError

#: Xen's PVH entry note: ``n_type`` of a note named "Xen" (xen/include/public/elfnote.h).
XEN_ELFNOTE_PHYS32_ENTRY = 18
#: Unpacked kernels no LM of this daemon used for this long are removed (65 MB each for Debian).
KEEP_UNUSED_SECONDS = 30 * 86400
#: Largest kernel accepted, compressed and unpacked: a corrupt header must not eat the host.
MAX_KERNEL_BYTES = 512 * 1024 * 1024


class KernelError(LmrunnerError):
    """A bzImage's kernel cannot be booted directly (the reason says why; the bzImage is used)."""


def _xz(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=MAX_KERNEL_BYTES).decompress(
        data, MAX_KERNEL_BYTES
    )


def _lzma(data: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=MAX_KERNEL_BYTES).decompress(
        data, MAX_KERNEL_BYTES
    )


def _bzip2(data: bytes) -> bytes:
    return bz2.BZ2Decompressor().decompress(data, MAX_KERNEL_BYTES)


def _gzip(data: bytes) -> bytes:
    # A gzip member; whatever follows its end (the kernel's size) is ignored.
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data, MAX_KERNEL_BYTES)


#: Compressions Python reads natively, by the payload's magic bytes. zstd and lz4 kernels
#: (Fedora, some Ubuntu) have no reader in the standard library: they boot as bzImages.
DECOMPRESSORS: tuple[tuple[bytes, str, Callable[[bytes], bytes]], ...] = (
    (b"\xfd7zXZ\x00", "xz", _xz),
    (b"\x1f\x8b", "gzip", _gzip),
    (b"BZh", "bzip2", _bzip2),
    (b"\x5d\x00\x00", "lzma", _lzma),
    (b"\x7fELF", "none", lambda data: data),
)


def payload(image: bytes) -> tuple[str, bytes]:
    """The compressed kernel inside a bzImage and its compression's name.

    Uses the boot protocol's ``payload_offset``/``payload_length`` (protocol 2.08 and later),
    which point into the protected-mode part that starts after the setup sectors.

    Raises:
        KernelError: not a bzImage, too old a protocol, a payload out of bounds or unknown.
    """
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        raise KernelError("not a Linux bzImage (no HdrS header)")
    (protocol,) = struct.unpack_from("<H", image, 0x206)
    if protocol < 0x208:
        raise KernelError(f"boot protocol {protocol >> 8}.{protocol & 0xFF} has no payload fields")
    setup_sectors = image[0x1F1] or 4
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = (setup_sectors + 1) * 512 + offset
    if length == 0 or start + length > len(image):
        raise KernelError("the payload lies outside the file")
    data = image[start : start + length]
    for magic, name, _decompress in DECOMPRESSORS:
        if data.startswith(magic):
            return name, data
    raise KernelError(f"unknown kernel compression (magic {data[:4].hex()})")


def has_pvh_entry(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF has Xen's PVH entry note (QEMU boots it directly)."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        header = phoff + index * phentsize
        if header + 56 > len(elf):
            return False
        (p_type,) = struct.unpack_from("<I", elf, header)
        if p_type != 4:  # PT_NOTE
            continue
        (p_offset,) = struct.unpack_from("<Q", elf, header + 8)
        (p_filesz,) = struct.unpack_from("<Q", elf, header + 32)
        if _notes_have_pvh(elf, p_offset, min(p_offset + p_filesz, len(elf))):
            return True
    return False


def _notes_have_pvh(elf: bytes, position: int, end: int) -> bool:
    while position + 12 <= end:
        namesz, descsz, n_type = struct.unpack_from("<III", elf, position)
        name_at = position + 12
        name = elf[name_at : name_at + namesz].rstrip(b"\x00")
        if name == b"Xen" and n_type == XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        position = name_at + _align4(namesz) + _align4(descsz)
    return False


def _align4(size: int) -> int:
    return (size + 3) & ~3


def unpack(image: bytes) -> bytes:
    """The PVH-bootable ELF kernel inside a bzImage.

    Raises:
        KernelError: no payload, an unreadable compression, or an ELF without the PVH note.
    """
    name, data = payload(image)
    decompress = next(function for magic, n, function in DECOMPRESSORS if n == name)
    try:
        elf = decompress(data)
    except (lzma.LZMAError, zlib.error, OSError, ValueError, EOFError) as err:
        raise KernelError(f"the {name} payload does not decompress: {err}") from err
    if len(elf) >= MAX_KERNEL_BYTES:
        raise KernelError(f"the unpacked kernel exceeds {MAX_KERNEL_BYTES >> 20} MiB")
    if not has_pvh_entry(elf):
        raise KernelError("the kernel has no PVH entry point (built without CONFIG_PVH)")
    return elf


def cached(image: Path, cache_dir: Path) -> Path:
    """The unpacked kernel of ``image``, from ``cache_dir`` (written there, atomically, the first
    time). The file is named by the bzImage's SHA-256, so a replaced kernel gets a new one.

    Raises:
        KernelError: the kernel cannot be booted directly (the caller boots the bzImage).
        OSError: ``image`` or the cache cannot be read or written.
    """
    data = image.read_bytes()
    if len(data) > MAX_KERNEL_BYTES:
        raise KernelError(f"{image} is larger than {MAX_KERNEL_BYTES >> 20} MiB")
    target = cache_dir / f"{hashlib.sha256(data).hexdigest()}.elf"
    if target.exists():
        os.utime(target)  # in use: kept by prune()
        return target
    elf = unpack(data)
    cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Not durable: a kernel lost in a crash is unpacked again.
    atomic.write_bytes(target, elf, durable=False)
    return target


def prune(cache_dir: Path, keep: set[Path], older_than: float) -> list[Path]:
    """Remove unpacked kernels last used before ``older_than`` (a Unix time) and not in ``keep``
    (a running VM has its kernel in memory already: removing the file cannot harm it)."""
    removed = []
    for path in cache_dir.glob("*.elf"):
        with contextlib.suppress(FileNotFoundError):
            if path not in keep and path.stat().st_mtime < older_than:
                path.unlink()
                removed.append(path)
    return removed


class KernelCache:
    """:func:`cached` for one factory, remembering each bzImage by its stat, so that LM starts
    after the first neither read and hash it (~40 ms for 8 MB) nor retry a kernel that cannot
    be unpacked (~1 s)."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._lock = threading.Lock()
        self._known: dict[tuple[str, int, int, int, int], Path | KernelError] = {}

    def get(self, image: Path) -> Path:
        """As :func:`cached` (same errors; a KernelError is raised again for the same file)."""
        info = image.stat()
        key = (str(image), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        with self._lock:
            known = self._known.get(key)
            if isinstance(known, KernelError):
                raise known
            if known is not None and known.exists():
                return known
            try:
                found = cached(image, self.cache_dir)
            except KernelError as err:
                self._known[key] = err
                raise
            self._known[key] = found
            in_use = {path for path in self._known.values() if isinstance(path, Path)}
            prune(self.cache_dir, in_use, time.time() - KEEP_UNUSED_SECONDS)
            return found
