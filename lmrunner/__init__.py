"""lmrunner: fills a worker host with logical machines (Docker, Apptainer, QEMU)."""

__version__ = "0.1.0"
