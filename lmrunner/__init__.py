"""lmrunner: fills a worker host with logical machines (Docker, Apptainer, QEMU)."""

__version__ = "0.1.0"

#: Where the configuration is read from unless --config or $LMRUNNER_CONFIG says otherwise.
DEFAULT_CONFIG = "/etc/lmrunner/lmrunner.yaml"
