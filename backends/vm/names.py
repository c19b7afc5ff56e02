"""The names the VM backend gives things: QEMU's programs and the files it keeps.

Every LM has a folder ``<state_dir>/vm/<uuid>/`` (QEMU's working directory: the sockets are
relative to it); the two logs go to the LM's own directory, where ``lmrunner logs`` finds them.
"""

from __future__ import annotations

QEMU = "qemu-system-x86_64"
QEMU_IMG = "qemu-img"

#: Files in each LM's folder under <state_dir>/vm/<uuid>/.
RECORD, EXIT, SHUTDOWN = "lm.json", "exit.json", "shutdown.json"
QMP_SOCKET, EVENTS_SOCKET = "qmp.sock", "events.sock"
DRIVE, OVERLAY, SCRATCH = "config.iso", "overlay.qcow2", "scratch.qcow2"
KERNELS = "kernels"  # <state_dir>/vm/kernels: unpacked kernels (kernel.py), shared by all LMs
#: In the LM's directory: the guest's serial console and QEMU's own messages.
CONSOLE_LOG, QEMU_LOG = "console.log", "qemu.log"
