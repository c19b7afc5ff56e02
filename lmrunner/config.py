"""lmrunner's configuration: one YAML file plus conf.d/*.yaml, validated into frozen objects.

Names follow Vac's where Vac has one (the ``vac`` metadata of each option records Vac's name and
its deprecated spellings; ``lmrunner import-vac-conf`` uses it). Loading either returns a complete
:class:`Config` or raises :class:`~lmrunner.errors.ConfigError` listing every problem, one line
each; it never half-applies.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import lmrunner
from lmrunner.schema import REQUIRED, option

DEFAULT_CONFIG = Path(lmrunner.DEFAULT_CONFIG)
SECTIONS = ("factory", "machinetypes", "vacuum_pipes")
NAME_PATTERN = r"[a-z0-9][a-z0-9-]*"
NAME_TEXT = "a name of lower-case letters, digits and '-'"
FQDN_PATTERN = r"([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]*[a-z0-9])?"
FQDN_TEXT = "a fully qualified domain name such as vac01.example.com"
SIMPLE_NAME = r"[A-Za-z0-9._-]+"
#: Keys lmrunner writes into machinefeatures/ itself; options may only add others.
STANDARD_MACHINEFEATURES = frozenset(
    {"total_cpu", "hs06", "shutdowntime", "grace_secs", "phys_cores", "log_cores", "jobslots"}
)
#: A TCP/UDP port, 1-65535.
PORT_PATTERN = (
    r"([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
)


class BackendName(StrEnum):
    """The engine that runs a machinetype's logical machines."""

    DOCKER = "docker"
    APPTAINER = "apptainer"
    VM = "vm"
    FAKE = "fake"  # LMs simulated by lmrunner itself: tests, demos, benchmarks


class MjfEnvStyle(StrEnum):
    """How ``$MACHINEFEATURES``/``$JOBFEATURES``/``$JOBOUTPUTS`` are written for the payload."""

    PATH = "path"  # /etc/jobfeatures: works with `cat $JOBFEATURES/x` and Python's open()
    FILE_URL = "file_url"  # file:///etc/jobfeatures: works with urllib's urlopen() (DIRAC)
    HTTP = "http"  # http://169.254.169.253/jobfeatures: Vac's VM metadata service (VMs only)
    AUTO = "auto"  # http for VMs that have the metadata service, path for everything else


class CgroupManager(StrEnum):
    """Who makes the LM cgroups on a cgroup v2 host (lmrunner.cgroups.open_controller)."""

    AUTO = "auto"  # systemd where systemd is PID 1, else cgroupfs
    SYSTEMD = "systemd"  # transient slices through systemd (its rules: one writer per subtree)
    CGROUPFS = "cgroupfs"  # directories lmrunner writes itself


class DiskMethodName(StrEnum):
    """How each LM gets a filesystem of its own (lmrunner.diskmethods.open_disk_method)."""

    AUTO = "auto"  # loop where this host can mount loop devices, else none (logged)
    LOOP = "loop"  # a sparse ext4 image per LM, loop-mounted; refuse to run without it
    NONE = "none"  # LMs write into the state directory, unbounded


@dataclass(frozen=True, slots=True)
class FactoryConfig:
    """The ``factory:`` section (Vac's ``[settings]``)."""

    space: str = option(
        REQUIRED,
        "Name of the space of factories sharing target shares; also the virtual CE name, APEL "
        "SubmitHost and DN.",
        vac="vac_space",
        pattern=FQDN_PATTERN,
        pattern_text=FQDN_TEXT,
    )
    hostname: str = option(
        "",
        "This factory's fully qualified name; LM names are derived from it (<host>-NN.<domain>).",
        pattern=FQDN_PATTERN,
        pattern_text=FQDN_TEXT,
        default_text="the host's FQDN",
    )
    description: str = option("", "Free text describing the space.", vac="description")
    factories: tuple[str, ...] = option(
        (),
        "Factories of the space ('.' = this host; must include this factory when given): each "
        "is asked through VacQuery what it runs, so target shares and backoff (an abort "
        "anywhere) hold across the space; `lmrunner factories` lists them.",
        vac="factories",
    )
    state_dir: Path = option(
        Path("/var/lib/lmrunner"),
        "Where the state database, per-LM directories, pipe cache and APEL records live.",
    )
    total_processors: int = option(
        0,
        "Processors allocatable to LMs; at most the CPUs this process may use.",
        vac=("total_processors", "cpu_total"),
        minimum=0,
        default_text="CPUs usable by this process (cpuset aware)",
    )
    processors_per_superslot: int = option(
        1,
        "Superslot size and the most processors one LM may have.",
        vac=("processors_per_superslot", "vcpu_per_machine", "cpu_per_machine"),
        minimum=1,
    )
    mb_per_processor: int = option(
        2048,
        "Memory per processor, the LM's hard memory limit.",
        unit="MiB",
        vac=("mb_per_processor", "mb_per_cpu"),
        minimum=64,
    )
    pids_per_processor: int = option(
        4096, "Most processes and threads per processor in an LM (pids limit; 0: none).", minimum=0
    )
    cgroup_parent: str = option(
        "/lmrunner",
        "Parent cgroup of every LM (one child per LM). /path: from each hierarchy's root (one "
        "path in every hierarchy, as Docker needs); path: under lmrunner's own cgroup (v1).",
        pattern=r"/?[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*",
        pattern_text="a cgroup path such as /lmrunner",
    )
    cgroup_manager: CgroupManager = option(
        CgroupManager.AUTO,
        "Who makes the LM cgroups on a cgroup v2 host: 'systemd' (each LM a transient slice in "
        "<cgroup_parent>.slice, as systemd's delegation rules and Docker's systemd cgroup "
        "driver need), 'cgroupfs' (directories under cgroup_parent) or 'auto' (systemd when "
        "systemd is PID 1). v1 hosts always use cgroupfs.",
    )
    cgroup_delegate: bool = option(
        False,
        "Hand each LM's cgroup to the account its LM runs as, so pilots can split it further "
        "(cgroup v2 delegation; the limits above it still hold).",
    )
    memory_high_ratio: float = option(
        0.95,
        "cgroup v2 memory.high as a fraction of the LM's memory limit (reclaim starts there).",
        minimum=0.5,
        maximum=1.0,
    )
    vm_accel: str = option(
        "auto",
        "QEMU accelerator for VM LMs: auto (KVM when a probe guest boots under it, else TCG), "
        "kvm or tcg.",
        pattern=r"auto|kvm|tcg",
        pattern_text="auto, kvm or tcg",
    )
    vm_direct_kernel: str = option(
        "auto",
        "Boot VM kernels (bzImage) through their uncompressed ELF and PVH entry, unpacked once "
        "into the state directory: saves the guest's own decompression (~5 s under TCG; the "
        "guest loses KASLR). auto: under TCG only; always; never. Kernels without PVH boot as "
        "given.",
        pattern=r"auto|always|never",
        pattern_text="auto, always or never",
    )
    swap_mb_per_processor: int = option(
        0, "Swap per processor an LM may use (max_swap_bytes).", unit="MiB", minimum=0
    )
    hs06_per_processor: float | None = option(
        None,
        "HEPSPEC06 per processor (1.0 is used for shares when unset).",
        vac=("hs06_per_processor", "hs06_per_cpu"),
        minimum=0,
    )
    disk_gb_per_processor: float = option(
        40.0,
        "Scratch disk per processor (scratch_limit_bytes; VM scratch disk size).",
        unit="GB (10^9 bytes)",
        vac=("disk_gb_per_processor", "scratch_gb", "disk_gb_per_cpu"),
        minimum=0,
    )
    disk_method: DiskMethodName = option(
        DiskMethodName.AUTO,
        "How each LM's writable space (joboutputs, tmp_binds, container work folders, VM disks) "
        "is bounded at its disk size: 'loop' (a sparse ext4 image per LM in "
        "<state_dir>/disks, loop-mounted on the LM's mnt folder; the LM meets ENOSPC at its "
        "size), 'none' (unbounded, in the state directory) or 'auto' (loop where the host "
        "can, else none). An LM whose disk size is 0 gets none.",
    )
    disk_overcommit: float = option(
        1.0,
        "How many times the state directory's free space the factory may promise as LM disks "
        "(they are sparse: space is taken as payloads write). 1.0: every promised byte is "
        "there; an LM that would promise more does not start.",
        minimum=1.0,
    )
    history_days: float = option(
        30.0,
        "Days after its end an LM leaves the state store (ps --all, the status page), once its "
        "directory is removed (machinetypes' machines_dir_days; never while kept), its disk "
        "and cgroup released and its accounting record written; pruned in small batches beside "
        "the loop. Each machinetype's latest ended LM is kept. 0: forever.",
        unit="days",
        minimum=0,
    )
    accounting_days: float = option(
        800.0,
        "Days accounting records (lmrunner accounting, apel-sync) are kept after the LM ended, "
        "once their APEL message is written and the LM left the store. 0: forever.",
        unit="days",
        minimum=0,
    )
    overload_per_processor: float = option(
        1.25,
        "No LM is started while the load average exceeds this times the running processors.",
        vac=("overload_per_processor", "overload_per_cpu"),
        minimum=0,
    )
    draining: bool = option(False, "true = start no new LMs.", vac="draining")
    shutdown_time: int | None = option(
        None,
        "Time by which every LM must have stopped (Unix time or ISO 8601; naive times are UTC).",
        unit="Unix time",
        vac="shutdown_time",
    )
    udp_timeout_seconds: float = option(
        10.0,
        "How long a VacQuery round may take in all (Vac's per-round silence is a fifth of it).",
        unit="s",
        vac="udp_timeout_seconds",
        minimum=0.1,
    )
    vacquery_port: int = option(
        995,
        "UDP port of the VacQuery responder (Vac's 995), which answers other factories' and "
        "Vac's queries about this factory's LMs and machinetypes; also the port queries go to. "
        "0: no responder.",
        minimum=0,
        maximum=65535,
    )
    space_secret_file: Path | None = option(
        None,
        "File holding the space's shared secret (root's, mode 0600, 16 bytes or more, e.g. "
        "from 'openssl rand -hex 32'). When set, VacQuery between lmrunner factories is signed "
        "(HMAC-SHA256, within 60 s, each request answered to one address): unsigned or "
        "forged datagrams are neither answered nor used. Unset: Vac's plain protocol.",
    )
    space_answer_vac: bool = option(
        False,
        "With a space secret: also answer Vac factories' unsigned queries, unsigned, so a "
        "mixed space's Vac factories count this one's LMs. Read-only: their replies never "
        "change this factory's decisions.",
    )
    sc_user: str = option(
        "lmrunner-sc",
        "Unprivileged account that runs Apptainer LMs (never root).",
        vac="singularity_user",
        pattern=r"[a-z_][a-z0-9_-]*",
        pattern_text="an account name",
    )
    root_public_key: Path | None = option(
        Path("/root/.ssh/id_rsa.pub"),
        "SSH public key offered to VM LMs in their metadata (ignored when the file is missing).",
        vac="root_public_key",
    )
    gocdb_sitename: str | None = option(
        None,
        "GOCDB site name: APEL 'Site'; enables apel-outgoing.",
        vac="gocdb_sitename",
    )
    gocdb_cert_file: Path | None = option(
        None,
        "Certificate for Vac's daily GOCDB capacity updates.",
        vac="gocdb_cert_file",
        unsupported="not supported by lmrunner: it sends no GOCDB updates",
    )
    gocdb_key_file: Path | None = option(
        None,
        "Key for Vac's daily GOCDB capacity updates.",
        vac="gocdb_key_file",
        unsupported="not supported by lmrunner: it sends no GOCDB updates",
    )
    vacmon_hostport: tuple[str, ...] = option(
        (),
        "VacMon receivers (host:port, e.g. vacmon.gridpp.ac.uk:8884): after passes (at most "
        "every 10 s) this factory's factory_status and machinetype_status, and each ended LM's "
        "machine_status, as Vac sends them (UDP, fire-and-forget).",
        vac="vacmon_hostport",
        pattern=r"[A-Za-z0-9.-]+:" + PORT_PATTERN,
        pattern_text="host:port (port 1-65535)",
    )
    metrics_listen: str | None = option(
        None,
        "Address (host:port, [v6]:port) where the daemon serves Prometheus metrics at /metrics "
        "and its read-only status page at /, e.g. 127.0.0.1:9525 or :9525 (every interface). "
        "Unset: no HTTP endpoint.",
        pattern=r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]*):" + PORT_PATTERN,
        pattern_text="host:port (port 1-65535)",
    )
    version_logger: int = option(
        0,
        "factory_status messages per day to the GridPP version logger (Vac sent one a day by "
        "default).",
        vac="version_logger",
        minimum=0,
        unsupported="not supported by lmrunner: it sends nothing to the GridPP version logger",
    )
    allow_http: bool = option(
        False,
        "Also fetch http:// images and user_data (no TLS: anyone on the path can change them; "
        "pin images with image_digest). https:// always works.",
    )
    ca_path: Path | None = option(
        None,
        "CA certificates for https downloads (images, user_data, pipes): a PEM bundle or a "
        "folder of hashed certificates (/etc/grid-security/certificates style).",
        default_text="/etc/grid-security/certificates when it exists, else the system's CAs",
    )
    image_max_gb: float = option(
        20.0,
        "Largest remote image the download cache accepts.",
        unit="GB (10^9 bytes)",
        minimum=0.001,
    )
    image_cache_days: float = option(
        7.0,
        "Downloaded images no machinetype names any more are removed after this long unused.",
        unit="days",
        minimum=0,
    )
    download_timeout_seconds: float = option(
        120.0,
        "Connect and read timeout of image, user_data and pipe downloads (Vac: 120 s for images).",
        unit="s",
        minimum=1,
    )
    machinefeatures_options: Mapping[str, str] = option(
        {}, "Extra $MACHINEFEATURES/NAME files with these values.", vac="machinefeatures_option_*"
    )
    user_data_options: Mapping[str, str] = option(
        {},
        "Defaults for ##user_data_option_NAME## in every machinetype.",
        vac="user_data_option_*",
    )
    user_data_files: Mapping[str, str] = option(
        {},
        "Defaults for ##user_data_option_NAME## (and ##user_data_file_NAME##) read from files.",
        vac="user_data_file_*",
    )


@dataclass(frozen=True, slots=True)
class MachinetypeConfig:
    """One entry of ``machinetypes:`` (Vac's ``[machinetype NAME]``), after pipe expansion."""

    name: str = field(metadata={})
    backend: BackendName = option(
        REQUIRED,
        "Engine that runs this type's LMs (Vac machine_model: docker -> docker, singularity -> "
        "apptainer, cernvm3/cernvm4/vm-raw -> vm); fake simulates LMs for tests and demos.",
        vac=("machine_model", "vm_model"),
    )
    image: str = option(
        REQUIRED,
        "docker://REF or local image (docker); directory, SIF or docker:// (apptainer); disk "
        "image (qcow2, raw), ISO or kernel (vm). Relative names are looked up in the "
        "machinetype's files/. An https:// URL (apptainer, vm) is downloaded once into "
        "<state_dir>/images and its LMs wait for the copy (`lmrunner images`).",
        vac="root_image",
    )
    image_digest: str | None = option(
        None,
        "sha256:HEX of a remote (https://) image: a download that does not match is never used.",
        pattern=r"sha256:[0-9a-f]{64}",
        pattern_text="sha256: and 64 lower-case hex digits",
    )
    user_data: str | None = option(
        None,
        "Template of the LM's user_data: a path or an https URL (relative: in files/; http:// "
        "with factory.allow_http).",
        vac="user_data",
    )
    container_command: str = option(
        "/user_data", "Command containers run.", vac="container_command"
    )
    tmp_binds: tuple[str, ...] = option(
        (),
        "In-container paths that get a fresh empty host directory each.",
        vac="tmp_binds",
        pattern=r"/[^\s]*",
        pattern_text="absolute in-container paths",
    )
    cvmfs_repositories: tuple[str, ...] = option(
        (),
        "CernVM-FS repositories the LMs use; non-empty binds /cvmfs into containers.",
        vac="cvmfs_repositories",
        pattern=SIMPLE_NAME,
        pattern_text="repository names without '/'",
    )
    target_share: float = option(
        0.0, "Relative share across the space; 0 starts none.", vac="target_share", minimum=0
    )
    machinegroup: str | None = option(
        None,
        "Group for share sorting.",
        vac="machinegroup",
        default_text="accounting_fqan, else the machinetype name",
    )
    min_processors: int = option(1, "Fewest processors per LM.", vac="min_processors", minimum=1)
    max_processors: int = option(1, "Most processors per LM.", vac="max_processors", minimum=1)
    max_wallclock_seconds: int = option(
        86400, "LM lifetime (sets its shutdowntime).", unit="s", vac="max_wallclock_seconds",
        minimum=1,
    )  # fmt: skip
    min_wallclock_seconds: int | None = option(
        None,
        "Minimum remaining lifetime required to start an LM.",
        unit="s",
        vac="min_wallclock_seconds",
        minimum=0,
        default_text="max_wallclock_seconds",
    )
    backoff_seconds: int = option(
        10, "Pause after an abort (shutdown code >= 300).", unit="s", vac="backoff_seconds",
        minimum=0,
    )  # fmt: skip
    fizzle_seconds: int = option(
        600,
        "An LM that ends sooner without a message counts as an abort; also the probing window.",
        unit="s",
        vac="fizzle_seconds",
        minimum=0,
    )
    heartbeat_file: str | None = option(
        None,
        "Liveness file in $JOBOUTPUTS.",
        vac="heartbeat_file",
        pattern=SIMPLE_NAME,
        pattern_text="a file name without '/'",
    )
    heartbeat_seconds: int = option(
        0, "Longest allowed age of heartbeat_file (0: only its existence).", unit="s",
        vac="heartbeat_seconds", minimum=0,
    )  # fmt: skip
    capabilities: tuple[str, ...] = option(
        (),
        "Linux capabilities added to the LM's reduced default set (Docker), e.g. SYS_ADMIN for "
        "CernVM-style payloads that mount; `lmrunner check` warns about each.",
        pattern=r"[A-Z_]+",
        pattern_text="capability names such as SYS_ADMIN",
    )
    stop_grace_seconds: int = option(
        60,
        "Time between the stop signal (SIGTERM, ACPI) and the kill; grace_secs in MJF.",
        unit="s",
        minimum=0,
    )
    accounting_fqan: str | None = option(
        None,
        "VOMS FQAN for APEL records and GOCDB shares.",
        vac="accounting_fqan",
        pattern=r"/[^\s%]+",
        pattern_text="an FQAN such as /lhcb/Role=pilot",
    )
    vm_initrd: str | None = option(
        None,
        "VM: initramfs booted with the kernel given as image (relative: in files/).",
    )
    vm_kernel_append: str = option(
        "console=ttyS0 panic=-1", "VM: kernel command line when image is a kernel."
    )
    vm_network: str = option(
        "user",
        "VM networking: user (QEMU user-mode, outbound only, no root bridge) or bridge:NAME "
        "(a bridge the admin prepared).",
        pattern=r"user|bridge:[A-Za-z0-9_.-]+",
        pattern_text="user or bridge:NAME",
    )
    machines_dir_days: float = option(
        3.0,
        "Days an LM's directory is kept after it finished (0: forever).",
        unit="days",
        vac=("machines_dir_days", "machineoutputs_days"),
        minimum=0,
    )
    disk_gb_per_processor: float | None = option(
        None,
        "Scratch disk per processor for this type; used only when at most the factory's.",
        unit="GB (10^9 bytes)",
        vac="disk_gb_per_processor",
        minimum=0,
    )
    root_device: str = option(
        "vda", "VM device name of the root disk.", vac="root_device", pattern=r"[a-z0-9]+",
        pattern_text="a device name of [a-z0-9]",
        unsupported="not supported by lmrunner: a disk image is always the first virtio disk "
        "(vda; /dev/disk/by-id/virtio-root)",
    )  # fmt: skip
    scratch_device: str = option(
        "vdb", "VM device name of the scratch disk.", vac="scratch_device", pattern=r"[a-z0-9]+",
        pattern_text="a device name of [a-z0-9]",
        unsupported="not supported by lmrunner: the scratch disk is the next virtio disk (vdb "
        "after a disk image, vda after an ISO or kernel; /dev/disk/by-id/virtio-scratch)",
    )  # fmt: skip
    image_signing_dn: str | None = option(
        None,
        "Regular expression the CernVM image signer's DN must match.",
        vac=("image_signing_dn", "cernvm_signing_dn"),
        unsupported="not supported by lmrunner: it checks no CernVM image signature (pin a "
        "remote image with image_digest)",
    )
    user_data_proxy: bool = option(
        False,
        "Embed an RFC 3820 limited proxy (##user_data_option_x509_proxy##) made from x509_cert "
        "and x509_key, expiring at the LM's shutdowntime.",
        vac="user_data_proxy",
    )
    legacy_proxy: bool = option(
        False, "Make the proxy in the legacy Globus style instead.", vac="legacy_proxy"
    )
    x509_cert: Path | None = option(
        None,
        "Certificate for user_data_proxy.",
        default_text="<state_dir>/machinetypes/NAME/x509cert.pem",
    )
    x509_key: Path | None = option(
        None,
        "Key for user_data_proxy (may be the same file).",
        default_text="<state_dir>/machinetypes/NAME/x509key.pem",
    )
    mjf_env_style: MjfEnvStyle = option(
        MjfEnvStyle.AUTO,
        "How $MACHINEFEATURES, $JOBFEATURES, $JOBOUTPUTS and their ##user_data_*_url## are "
        "written: 'path' (/etc/jobfeatures: shell and open()), 'file_url' "
        "(file:///etc/jobfeatures: Python's urlopen(), as DIRAC reads MJF), 'http' "
        "(http://169.254.169.253/jobfeatures: Vac's VM metadata service, VMs on user "
        "networking only) or 'auto' (http for those VMs, as Vac; path otherwise).",
    )
    user_data_options: Mapping[str, str] = option(
        {}, "Values for ##user_data_option_NAME## (override the factory's).",
        vac="user_data_option_*",
    )  # fmt: skip
    user_data_files: Mapping[str, str] = option(
        {},
        "Files whose contents fill ##user_data_option_NAME## / ##user_data_file_NAME## "
        "(relative: in files/).",
        vac="user_data_file_*",
    )
    files_dir: Path | None = option(
        None,
        "Where relative user_data, image and user_data_files names are found (Vac: "
        "/var/lib/vac/machinetypes/NAME/files).",
        default_text="<state_dir>/machinetypes/NAME/files (NAME: the pipe for pipe types)",
    )
    pipe: str | None = field(default=None, metadata={})  # set by lmrunner: the pipe it came from

    @property
    def effective_min_wallclock(self) -> int:
        if self.min_wallclock_seconds is None:
            return self.max_wallclock_seconds
        return self.min_wallclock_seconds

    @property
    def effective_machinegroup(self) -> str:
        return self.machinegroup or self.accounting_fqan or self.name


@dataclass(frozen=True, slots=True)
class PipeConfig:
    """One entry of ``vacuum_pipes:`` (Vac's ``[vacuum_pipe PREFIX]``)."""

    name: str = field(metadata={})
    url: str = option(
        REQUIRED, "Where the pipe's JSON document is published (https).", vac="vacuum_pipe_url"
    )
    target_share: float = option(
        0.0,
        "Total share of the pipe's machinetypes, split by their own target_share.",
        vac="target_share",
        minimum=0,
    )
    allow_http: bool = option(False, "Also accept a plain http URL (no integrity).")
    max_bytes: int = option(1048576, "Largest pipe document accepted.", unit="bytes", minimum=1024)
    timeout_seconds: float = option(30.0, "Fetch timeout.", unit="s", minimum=1)
    overrides: Mapping[str, Any] = option(
        {},
        "Machinetype options applied to every type of the pipe (over the pipe's own values; "
        "a local machinetype NAME-SUFFIX overrides both).",
    )


@dataclass(frozen=True, slots=True)
class Config:
    """The whole, validated configuration."""

    factory: FactoryConfig
    machinetypes: Mapping[str, MachinetypeConfig]
    pipes: Mapping[str, PipeConfig]
    files: tuple[Path, ...]
    warnings: tuple[str, ...] = ()

    def machinetype_dir(self, name: str) -> Path:
        """Vac's machinetype path: admin-provided files (x509cert.pem, x509key.pem, files/)."""
        mt = self.machinetypes.get(name)
        return self.factory.state_dir / "machinetypes" / (mt.pipe if mt and mt.pipe else name)

    def files_dir(self, name: str) -> Path:
        """Where relative file names of machinetype ``name`` are looked up."""
        mt = self.machinetypes.get(name)
        if mt is not None and mt.files_dir is not None:
            return mt.files_dir
        return self.machinetype_dir(name) / "files"


def resolve_local(name: str, files_dir: Path) -> Path:
    """An absolute path as is; a relative one in the machinetype's files/ (as Vac did)."""
    return Path(name) if name.startswith("/") else files_dir / name


def effective_disk_gb(mt: MachinetypeConfig, factory: FactoryConfig) -> float:
    """Vac's rule: the machinetype's value applies only when it is at most the factory's."""
    if (
        mt.disk_gb_per_processor is not None
        and mt.disk_gb_per_processor <= factory.disk_gb_per_processor
    ):
        return mt.disk_gb_per_processor
    return factory.disk_gb_per_processor


def as_dict(config: Config) -> dict[str, Any]:
    """The effective configuration as plain data (what ``lmrunner check`` prints)."""
    from lmrunner.schema import fields_of

    def plain(obj: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f, _hint in fields_of(type(obj)):
            value = getattr(obj, f.name)
            out[f.name] = _plain_value(value)
        return out

    return {
        "factory": plain(config.factory),
        "machinetypes": {name: plain(mt) for name, mt in config.machinetypes.items()},
        "vacuum_pipes": {name: plain(p) for name, p in config.pipes.items()},
    }


def _plain_value(value: Any) -> Any:
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain_value(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain_value(v) for k, v in value.items()}
    return value
