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
import mmap
import os
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from lmrunner import runner
from lmrunner.errors import CommandError, LmrunnerError

#: Xen's PVH entry note: ``n_type`` of a note named "Xen" (xen/include/public/elfnote.h).
XEN_ELFNOTE_PHYS32_ENTRY = 18
#: Unpacked kernels no LM of this daemon used for this long are removed (65 MB each for Debian).
KEEP_UNUSED_SECONDS = 30 * 86400
#: Largest bzImage read, and largest kernel unpacked: a corrupt file must not eat the host.
MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_KERNEL_BYTES = 512 * 1024 * 1024
#: Unpacked this much at a time.
CHUNK_BYTES = 4 * 1024 * 1024
#: The child that unpacks (:func:`unpack_in_child`): its time limit and "not bootable" status.
CHILD_TIMEOUT = 120.0
NOT_BOOTABLE = 2
#: Part of every cached file's name: a changed unpacker never trusts an older one's files.
FORMAT = "v1"
#: How long an unpack that failed for an OSError (disk full, permissions) is not retried.
RETRY_SECONDS = 600.0


class KernelError(LmrunnerError):
    """A bzImage's kernel cannot be booted directly (the reason says why; the bzImage is used)."""


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


class _Whole:
    """An uncompressed payload: the ELF as it is."""

    eof = True

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        return data


#: Compressions Python reads natively, by the payload's magic bytes. zstd and lz4 kernels
#: (Fedora, recent Ubuntu) have no reader in the standard library: they boot as bzImages.
DECOMPRESSORS: tuple[tuple[bytes, str, Callable[[], _Decompressor]], ...] = (
    (b"\xfd7zXZ\x00", "xz", lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ, MAX_KERNEL_BYTES)),
    # A gzip member; what follows its end (the kernel's size) is left unused.
    (b"\x1f\x8b", "gzip", lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)),
    (b"BZh", "bzip2", bz2.BZ2Decompressor),
    (b"\x5d\x00\x00", "lzma", lambda: lzma.LZMADecompressor(lzma.FORMAT_ALONE, MAX_KERNEL_BYTES)),
    (b"\x7fELF", "none", _Whole),
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
        return False  # not ELF, not 64-bit or not little-endian
    if struct.unpack_from("<H", elf, 0x12)[0] != 62:  # e_machine: EM_X86_64
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
        (p_align,) = struct.unpack_from("<Q", elf, header + 48)
        align = 8 if p_align == 8 else 4  # gABI: 4-byte notes, or 8 in an 8-aligned segment
        if _notes_have_pvh(elf, p_offset, min(p_offset + p_filesz, len(elf)), align):
            return True
    return False


def _notes_have_pvh(elf: bytes, position: int, end: int, align: int) -> bool:
    while position + 12 <= end:
        namesz, descsz, n_type = struct.unpack_from("<III", elf, position)
        name_at = position + 12
        name = elf[name_at : name_at + namesz].rstrip(b"\x00")
        if name == b"Xen" and n_type == XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        position = name_at + _aligned(namesz, align) + _aligned(descsz, align)
    return False


def _aligned(size: int, align: int) -> int:
    return (size + align - 1) & ~(align - 1)


def _unpack_into(image: bytes, write: Callable[[bytes], object]) -> None:
    """Decompress a bzImage's kernel chunk by chunk into ``write`` (the daemon never holds the
    whole unpacked kernel, ~65 MB for Debian's, in memory).

    Raises:
        KernelError: no payload, a stream that does not decompress, is too large or ends early.
    """
    name, data = payload(image)
    decompressor = next(make() for _magic, n, make in DECOMPRESSORS if n == name)
    total = 0
    try:
        chunk = decompressor.decompress(data, CHUNK_BYTES)
        while True:
            total += len(chunk)
            if total >= MAX_KERNEL_BYTES:
                raise KernelError(f"the unpacked kernel exceeds {MAX_KERNEL_BYTES >> 20} MiB")
            write(chunk)
            if decompressor.eof:
                return
            tail = getattr(decompressor, "unconsumed_tail", b"")  # zlib: input it kept back
            if tail:
                chunk = decompressor.decompress(tail, CHUNK_BYTES)
            elif getattr(decompressor, "needs_input", True):  # all input used, no end seen
                break
            else:  # lzma, bz2: output is waiting
                chunk = decompressor.decompress(b"", CHUNK_BYTES)
    except (lzma.LZMAError, zlib.error, OSError, ValueError, EOFError) as err:
        raise KernelError(f"the {name} payload does not decompress: {err}") from err
    # a cut stream decompresses without error, into a partial kernel
    raise KernelError(f"the {name} payload ends before its stream does")


def unpack(image: bytes) -> bytes:
    """The PVH-bootable ELF kernel inside a bzImage, in memory (tests; the cache streams).

    Raises:
        KernelError: no payload, a stream that does not decompress or ends early, or an ELF
            without the PVH note.
    """
    elf = bytearray()
    _unpack_into(image, elf.extend)
    if not has_pvh_entry(bytes(elf)):
        raise KernelError("the kernel has no PVH entry point (built without CONFIG_PVH)")
    return bytes(elf)


def _file_has_pvh(path: Path) -> bool:
    """:func:`has_pvh_entry` of a file, mapped: only its headers and notes are read."""
    with path.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            return False
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return has_pvh_entry(mapped)  # type: ignore[arg-type]


def cached(image: Path, cache_dir: Path) -> Path:
    """The unpacked kernel of ``image``, from ``cache_dir`` (written there, atomically and
    durably, the first time). The file is named by the bzImage's SHA-256 and this module's
    format, so a replaced kernel or a changed unpacker gets a new one; a file found there is
    checked (an ELF with the PVH note) before it is trusted.

    Raises:
        KernelError: the kernel cannot be booted directly (the caller boots the bzImage).
        OSError: ``image`` or the cache cannot be read or written.
    """
    if image.stat().st_size > MAX_IMAGE_BYTES:
        raise KernelError(f"{image} is larger than {MAX_IMAGE_BYTES >> 20} MiB")
    data = image.read_bytes()
    target = cache_dir / f"{hashlib.sha256(data).hexdigest()}.{FORMAT}.elf"
    with contextlib.suppress(FileNotFoundError):
        if _file_has_pvh(target):
            os.utime(target)  # in use: kept by prune()
            return target
    cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Streamed into a temporary file (named as prune() knows), checked, made durable, renamed:
    # a torn file must never be what a later daemon finds (it is checked, too).
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=cache_dir)
    temporary = Path(name)
    try:
        os.fchmod(fd, 0o644)  # QEMU, run as the LM's account, reads it
        with os.fdopen(fd, "wb") as out:
            _unpack_into(data, out.write)
            out.flush()
            os.fsync(out.fileno())
        if not _file_has_pvh(temporary):
            raise KernelError("the kernel has no PVH entry point (built without CONFIG_PVH)")
        temporary.replace(target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def prune(cache_dir: Path, keep: set[Path], older_than: float) -> list[Path]:
    """Remove unpacked kernels last used before ``older_than`` (a Unix time) and not in ``keep``
    (a running VM has its kernel in memory already: removing the file cannot harm it), and
    temporary files an unpack killed midway left (``.NAME.XXXX``) after an hour."""
    removed = []
    abandoned = time.time() - 3600
    candidates = [(p, older_than) for p in cache_dir.glob("*.elf")]
    candidates += [(p, abandoned) for p in cache_dir.glob(".*.elf.*")]
    for path, before in candidates:
        with contextlib.suppress(FileNotFoundError):
            if path not in keep and path.stat().st_mtime < before:
                path.unlink()
                removed.append(path)
    return removed


class KernelCache:
    """:func:`cached` for one factory, remembering each bzImage by its stat, so that LM starts
    after the first neither read and hash it (~40 ms for 8 MB) nor retry a kernel that cannot
    be unpacked (~1 s): a KernelError is remembered while the file is unchanged; an OSError
    (disk full, permissions) becomes a KernelError retried after ``RETRY_SECONDS``."""

    #: Files remembered at most (a bzImage replaced again and again must not grow the memo).
    LIMIT = 64

    def __init__(self, cache_dir: Path, unpack: Callable[[Path, Path], Path] | None = None) -> None:
        self.cache_dir = cache_dir
        self._unpack = unpack
        self._lock = threading.Lock()
        # stat of the bzImage -> (the unpacked kernel or why not, until when the answer holds)
        self._known: dict[tuple[str, int, int, int, int], tuple[Path | KernelError, float]] = {}

    def get(self, image: Path) -> Path:
        """As :func:`cached`, but every failure is a KernelError (raised again while known).

        Raises:
            KernelError: the kernel cannot be booted directly now (the caller boots the bzImage).
        """
        try:
            info = image.stat()
        except OSError as err:
            raise KernelError(f"cannot read {image}: {err.strerror}") from err
        key = (str(image), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        now = time.time()
        with self._lock:
            answer, until = self._known.get(key, (None, 0.0))
            if isinstance(answer, KernelError) and now < until:
                raise answer
            if isinstance(answer, Path) and answer.exists():
                if now >= until:  # in use for a day more: prune() must keep it
                    with contextlib.suppress(OSError):
                        os.utime(answer)
                    self._remember(key, answer, now + 86400)
                return answer
            try:
                found = (self._unpack or cached)(image, self.cache_dir)
            except KernelError as err:
                self._remember(key, err, float("inf"))
                raise
            except OSError as err:
                failed = KernelError(f"cannot unpack {image} into {self.cache_dir}: {err}")
                self._remember(key, failed, now + RETRY_SECONDS)
                raise failed from err
            self._remember(key, found, now + 86400)
            in_use = {path for path, _ in self._known.values() if isinstance(path, Path)}
            with contextlib.suppress(OSError):
                prune(self.cache_dir, in_use, now - KEEP_UNUSED_SECONDS)
            return found

    def _remember(
        self, key: tuple[str, int, int, int, int], answer: Path | KernelError, until: float
    ) -> None:
        if len(self._known) >= self.LIMIT:
            self._known.clear()
        self._known[key] = (answer, until)


def unpack_in_child(image: Path, cache_dir: Path) -> Path:
    """:func:`cached` in a child process. The xz decoder fills a dictionary of up to 64 MiB
    while it works: in the daemon that would stay as its peak memory for its whole life, and a
    corrupt kernel could take it down; in a child it costs one interpreter start per new kernel.

    Raises:
        KernelError: the kernel cannot be booted directly.
        OSError: the child could not unpack it (the cache cannot be written; retried later).
    """
    argv = [sys.executable, "-m", __name__, str(image), str(cache_dir)]
    try:
        done = runner.run(argv, timeout=CHILD_TIMEOUT, ok_codes=(0, NOT_BOOTABLE))
    except CommandError as err:
        raise OSError(f"unpacking {image} failed: {err}") from err
    if done.returncode == NOT_BOOTABLE:
        raise KernelError(done.stderr.strip() or f"{image} cannot be unpacked")
    found = Path(done.stdout.strip())
    if not found.is_absolute() or not found.is_file():
        raise OSError(f"unpacking {image}: the child named no kernel ({done.stdout.strip()!r})")
    return found


def _main(args: list[str]) -> int:
    """``python -m lmrunner.backends.vm.kernel IMAGE CACHE_DIR``: print the unpacked kernel's
    path (exit 0), or why the kernel cannot be booted directly (exit 2)."""
    image, cache_dir = (Path(arg) for arg in args)
    try:
        print(cached(image, cache_dir))
    except KernelError as err:
        print(err, file=sys.stderr)
        return NOT_BOOTABLE
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
