"""Synthetic Linux kernels for the VM backend's tests: ELF files with or without the PVH note,
and bzImages wrapping them as the kernel build does."""

from __future__ import annotations

import struct


def note(name: bytes, n_type: int, desc: bytes, align: int = 4) -> bytes:
    def pad(data: bytes) -> bytes:
        return data + b"\x00" * (-len(data) % align)

    return struct.pack("<III", len(name) + 1, len(desc), n_type) + pad(name + b"\x00") + pad(desc)


def elf(notes: bytes, *, bits: int = 2, machine: int = 62, align: int = 4) -> bytes:
    """A minimal little-endian ELF (64-bit, x86-64 unless told): a PT_LOAD, then a PT_NOTE."""
    phoff, phentsize, phnum = 64, 56, 2
    notes_at = phoff + phentsize * phnum
    header = bytearray(64)
    header[:6] = b"\x7fELF" + bytes([bits, 1])
    struct.pack_into("<H", header, 0x12, machine)
    struct.pack_into("<Q", header, 0x20, phoff)
    struct.pack_into("<HH", header, 0x36, phentsize, phnum)
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, 0, 0, 0)
    pt_note = struct.pack("<IIQQQQQQ", 4, 4, notes_at, 0, 0, len(notes), len(notes), align)
    return bytes(header) + load + pt_note + notes


PVH_NOTE = note(b"Xen", 18, struct.pack("<I", 0x1000000))
PVH_ELF = elf(note(b"GNU", 3, b"build-id") + PVH_NOTE + b"\x00" * 4096)
PLAIN_ELF = elf(note(b"Xen", 6, b"linux\x00"))


def bzimage(compressed: bytes, *, protocol: int = 0x20F, setup_sects: int = 3) -> bytes:
    """A bzImage as the build makes it: setup sectors with the header, then the protected-mode
    part: a (stand-in) decompressor, the compressed kernel and its uncompressed size (4 bytes,
    which mkpiggy counts in ``payload_length``)."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, protocol)
    decompressor = b"\x90" * 100
    payload = compressed + struct.pack("<I", 12345)
    struct.pack_into("<II", setup, 0x248, len(decompressor), len(payload))
    return bytes(setup) + decompressor + payload
