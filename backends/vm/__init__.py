"""Virtual-machine logical machines: one QEMU process per LM, started directly (no libvirt).

Each LM is one ``qemu-system-x86_64`` started through :mod:`lmrunner.process` inside the LM's
cgroup. QEMU starts as root, opens everything it needs (kernel, disks, config drive, shared
folders, sockets, ``/dev/kvm``, the bridge helper), then drops to the factory's ``sc_user`` with
``-runas`` and runs under a seccomp filter (``-sandbox``): a guest escaping into QEMU lands in an
unprivileged account, and the LM's joboutputs files belong to that account (docs/backends/vm.md).

- **Boot** (``plan.py``, ``argv.py``): a disk image (qcow2 or raw, through a per-LM
  copy-on-write qcow2 overlay, so the base is never written), an ISO (CernVM style, booted from
  a CD-ROM) or a kernel (``vm_initrd``, ``vm_kernel_append``; under TCG its unpacked ELF,
  ``kernel.py``). Memory and vCPUs are the LM's limits; a sparse qcow2 scratch disk holds
  ``disk_bytes``.
- **Contextualisation**: a config drive (``drive.py``) carries user_data and metadata;
  machine/job features (read-only), joboutputs (read-write) and ``/cvmfs`` are shared with
  virtio-9p under fixed mount tags (:data:`MOUNT_TAGS`).
- **Accelerator** (``accel.py``): KVM only when a probe guest boots under it within a timeout
  (some hosts have a ``/dev/kvm`` whose guests hang), otherwise TCG; the result is cached per
  host kernel and QEMU version in ``<state_dir>/vm/accel.json`` by an object the backend owns.
- **Control** (``qmp.py``): two QMP sockets per LM. ``events.sock`` is held open by the backend
  to learn why QEMU stopped (``SHUTDOWN`` reason, ``exits.py``: the guest powered off, reset or
  panicked, or the host quit it); ``qmp.sock`` takes short commands: ``stop`` presses the ACPI
  power button (``system_powerdown``), ``stop(force=True)`` sends ``quit`` and then SIGKILL.
- **State** (``names.py``): ``<state_dir>/vm/<uuid>/`` holds the record (``lm.json``: labels,
  pid and start time), the exit status, the shutdown reason, the sockets and the disks;
  ``destroy`` removes it. The guest's serial console goes to ``<LM dir>/console.log``, QEMU's
  own messages to ``<LM dir>/qemu.log`` (both shown by ``lmrunner logs``).

The backend itself is :class:`~lmrunner.backends.vm.driver.VmBackend`. This package's namespace
re-exports what the rest of lmrunner, the tests and the benchmarks use.
"""

from __future__ import annotations

from lmrunner.backends.vm.accel import (
    DEFAULT_PROBE_TIMEOUT,
    HOST_CACHE_DIR,
    QEMU_OVERHEAD_MIB,
    TCG_TB_MIB,
    Accel,
    AccelCache,
    AccelProbe,
    memory_overhead_bytes,
    probe_accel,
)
from lmrunner.backends.vm.argv import Launch, mac_address, qemu_argv
from lmrunner.backends.vm.driver import BOOT_UNPACKED, HANDLE_VERSION, VmBackend
from lmrunner.backends.vm.exits import REASONS, ended
from lmrunner.backends.vm.names import (
    CONSOLE_LOG,
    DRIVE,
    EVENTS_SOCKET,
    EXIT,
    KERNELS,
    OVERLAY,
    QEMU,
    QEMU_IMG,
    QEMU_LOG,
    QMP_SOCKET,
    RECORD,
    SCRATCH,
    SHUTDOWN,
)
from lmrunner.backends.vm.plan import (
    DEFAULT_APPEND,
    MOUNT_TAGS,
    PLACEMENT,
    ImageKind,
    Plan,
    image_kind,
    plan,
)
from lmrunner.backends.vm.qmp import QMP_LINE_LIMIT, QMP_TIMEOUT, QmpError

__all__ = [
    "BOOT_UNPACKED",
    "CONSOLE_LOG",
    "DEFAULT_APPEND",
    "DEFAULT_PROBE_TIMEOUT",
    "DRIVE",
    "EVENTS_SOCKET",
    "EXIT",
    "HANDLE_VERSION",
    "HOST_CACHE_DIR",
    "KERNELS",
    "MOUNT_TAGS",
    "OVERLAY",
    "PLACEMENT",
    "QEMU",
    "QEMU_IMG",
    "QEMU_LOG",
    "QEMU_OVERHEAD_MIB",
    "QMP_LINE_LIMIT",
    "QMP_SOCKET",
    "QMP_TIMEOUT",
    "REASONS",
    "RECORD",
    "SCRATCH",
    "SHUTDOWN",
    "TCG_TB_MIB",
    "Accel",
    "AccelCache",
    "AccelProbe",
    "ImageKind",
    "Launch",
    "Plan",
    "QmpError",
    "VmBackend",
    "ended",
    "image_kind",
    "mac_address",
    "memory_overhead_bytes",
    "plan",
    "probe_accel",
    "qemu_argv",
]
