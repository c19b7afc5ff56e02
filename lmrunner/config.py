"""lmrunner's configuration: one YAML file plus conf.d/*.yaml, validated into frozen objects.

Names follow Vac's where Vac has one (the ``vac`` metadata of each option records Vac's name and
its deprecated spellings; ``lmrunner import-vac-conf`` uses it). Loading either returns a complete
:class:`Config` or raises :class:`~lmrunner.errors.ConfigError` listing every problem, one line
each; it never half-applies.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import lmrunner
from lmrunner.errors import ConfigError
from lmrunner.schema import REQUIRED, Problems, build, option, unknown_key_message
from lmrunner.yamlsrc import Located, Where, load_yaml, one_line

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
        "Factories of the space queried through VacQuery ('.' = this host); must include this "
        "factory when given.",
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
        10.0, "Total VacQuery wait budget.", unit="s", vac="udp_timeout_seconds", minimum=0.1
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
        None, "Certificate for GOCDB updates.", vac="gocdb_cert_file"
    )
    gocdb_key_file: Path | None = option(None, "Key for GOCDB updates.", vac="gocdb_key_file")
    vacmon_hostport: tuple[str, ...] = option(
        (),
        "VacMon receivers (host:port) sent status messages.",
        vac="vacmon_hostport",
        pattern=r"[A-Za-z0-9.-]+:[0-9]+",
        pattern_text="host:port",
    )
    version_logger: int = option(
        0,
        "factory_status messages per day to the GridPP version logger. Opt-in: Vac sent one a "
        "day by default.",
        vac="version_logger",
        minimum=0,
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
        "image, ISO or kernel (vm). Relative names are looked up in the machinetype's files/.",
        vac="root_image",
    )
    user_data: str | None = option(
        None,
        "Template of the LM's user_data: a path or an https URL (relative: in files/).",
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
    )  # fmt: skip
    scratch_device: str = option(
        "vdb", "VM device name of the scratch disk.", vac="scratch_device", pattern=r"[a-z0-9]+",
        pattern_text="a device name of [a-z0-9]",
    )  # fmt: skip
    image_signing_dn: str | None = option(
        None,
        "Regular expression the CernVM image signer's DN must match.",
        vac=("image_signing_dn", "cernvm_signing_dn"),
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
        MjfEnvStyle.PATH,
        "How $MACHINEFEATURES, $JOBFEATURES, $JOBOUTPUTS and their ##user_data_*_url## are "
        "written: 'path' (/etc/jobfeatures: shell and open()) or 'file_url' "
        "(file:///etc/jobfeatures: Python's urlopen(), as DIRAC reads MJF).",
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


def usable_cpus() -> int:
    """CPUs this process may run on (respects cpusets and affinity, unlike /proc/cpuinfo)."""
    return len(os.sched_getaffinity(0))


def config_files(path: Path) -> list[Path]:
    """The main file followed by ``conf.d/*.yaml`` beside it, in name order."""
    confd = path.parent / "conf.d"
    if not confd.is_dir():
        return [path]
    try:
        entries = list(confd.iterdir())  # glob() takes an unreadable folder for an empty one
    except OSError as err:
        raise ConfigError(f"{one_line(str(confd))}: cannot read: {err.strerror or err}") from err
    # As glob("*.yaml"): no hidden files.
    wanted = (e for e in entries if e.name.endswith(".yaml") and not e.name.startswith("."))
    return [path, *sorted(wanted)]


def load_config(
    path: Path = DEFAULT_CONFIG,
    *,
    pipe_documents: Mapping[str, Any] | None = None,
    hostname: str | None = None,
    cpus: int | None = None,
    check_files: bool = True,
) -> Config:
    """Read, merge and validate the configuration.

    Args:
        path: the main YAML file; ``conf.d/*.yaml`` beside it are merged in name order.
        pipe_documents: the cached document of each Vacuum Pipe by name (see
            :mod:`lmrunner.pipes`); a pipe without one contributes no machinetypes yet.
        hostname: this host's FQDN (default: ``socket.getfqdn()``).
        cpus: CPUs usable by this process (default: :func:`usable_cpus`).
        check_files: verify that referenced local files exist and are readable.

    Raises:
        ConfigError: with ``.errors``, one line per problem, naming file, line, key and what
            was expected.
    """
    from lmrunner import pipes as pipes_mod  # pipes imports this module's types

    files = config_files(path)
    merged = Located(Where(str(path), 1))
    problems = Problems()
    for file in files:
        data = load_yaml(file) if file.exists() or file == path else None
        if data is None:
            continue
        if not isinstance(data, Located):
            problems.add(Where(str(file), 1), "(top level)", "expected a mapping of sections")
            continue
        _merge(merged, data)
    for key in merged:
        if key not in SECTIONS:
            problems.add(merged.where_of(key), key, unknown_key_message(key, list(SECTIONS)))

    factory_raw = _section(merged, "factory", problems)
    # shutdown_time also takes ISO 8601 text: _finish_factory parses it.
    factory = build(
        FactoryConfig, factory_raw, "factory", problems, skip=frozenset({"shutdown_time"})
    )
    if factory is not None:
        factory = _finish_factory(factory, factory_raw, problems, hostname, cpus)

    pipes: dict[str, PipeConfig] = {}
    pipes_raw = _section(merged, "vacuum_pipes", problems)
    for name, raw in pipes_raw.items():
        if _named_section(pipes_raw.where_of(name), name, raw, "vacuum_pipes", problems):
            built = build(PipeConfig, raw, f"vacuum_pipes.{name}", problems, extra={"name": name})
            if built is not None and pipes_mod.check_pipe(built, raw, problems):
                pipes[name] = built

    local_raw = _section(merged, "machinetypes", problems)
    warnings: list[str] = []
    expanded = pipes_mod.expand_pipes(pipes, pipe_documents or {}, local_raw, warnings)
    machinetypes: dict[str, MachinetypeConfig] = {}
    for name, raw in {**local_raw, **expanded}.items():
        where = raw.where if name in expanded else local_raw.where_of(name)
        if not _named_section(where, name, raw, "machinetypes", problems):
            continue
        pipe_name = raw.pop("__pipe__", None)
        extra = {"name": name, "pipe": pipe_name}
        path_ = f"machinetypes.{name}"
        if pipe_name is None and _pipe_of(name, pipes):
            # A local section named like a pipe's type the pipe does not (yet) offer: fine when
            # complete on its own, otherwise it is an override waiting for its pipe.
            scratch = Problems()
            if build(MachinetypeConfig, raw, path_, scratch, extra=extra) is None:
                warnings.append(
                    f"{local_raw.where_of(name)}: {path_}: pipe '{_pipe_of(name, pipes)}' offers "
                    "no such machinetype (yet); section ignored"
                )
                continue
        built_mt = build(MachinetypeConfig, raw, path_, problems, extra=extra)
        if built_mt is None:
            continue
        if pipe_name is None:
            machinetypes[name] = _finish_machinetype(built_mt, raw, problems)
            continue
        # A pipe's type that fails the checks across options (min above max, a bad regex) is
        # rejected alone, like a bad entry: a document must not stop the whole configuration.
        scratch = Problems()
        finished = _finish_machinetype(built_mt, raw, scratch)
        if scratch:
            warnings.extend(f"{line}; machinetype ignored" for line in scratch.lines)
        else:
            machinetypes[name] = finished

    if factory is not None:
        for mt in list(machinetypes.values()):
            if mt.pipe is None:
                _check_machinetype_files(mt, factory, problems, check_files)
                continue
            # A pipe's type whose files are missing here is rejected alone, like a bad entry.
            scratch = Problems()
            _check_machinetype_files(mt, factory, scratch, check_files)
            if scratch:
                warnings.extend(f"{line}; machinetype ignored" for line in scratch.lines)
                del machinetypes[mt.name]
    if problems:
        raise ConfigError("\n".join(problems.lines), errors=tuple(problems.lines))
    assert factory is not None
    return Config(
        factory=factory,
        machinetypes=dict(sorted(machinetypes.items())),
        pipes=pipes,
        files=tuple(f for f in files if f.exists()),
        warnings=tuple(one_line(line) for line in warnings),  # pipe URLs and keys as written
    )


def _merge(into: Located, new: Located) -> None:
    """Later files win per key; mappings merge recursively (a conf.d file can add one type)."""
    for key, value in new.items():
        old = into.get(key)
        if isinstance(old, Located) and isinstance(value, Located):
            _merge(old, value)
        else:
            into.put(key, value, new.where_of(key))


def _section(merged: Located, name: str, problems: Problems) -> Located:
    value = merged.get(name)
    if value is None:
        return Located(merged.where_of(name))
    if not isinstance(value, Located):
        problems.add(merged.where_of(name), name, "expected a mapping")
        return Located(merged.where_of(name))
    return value


def _named_section(where: Where, name: str, raw: Any, path: str, problems: Problems) -> bool:
    if not re.fullmatch(NAME_PATTERN, name):
        problems.add(where, f"{path}.{name}", f"expected {NAME_TEXT}")
        return False
    if not isinstance(raw, Located):
        problems.add(where, f"{path}.{name}", "expected a mapping of options")
        return False
    return True


def _pipe_of(name: str, pipes: Mapping[str, PipeConfig]) -> str | None:
    return next((p for p in pipes if name.startswith(f"{p}-")), None)


def parse_time(value: Any) -> int | None:
    """A Unix time from an int or an ISO 8601 text (naive = UTC); None when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        if value.strip().isascii() and value.strip().isdigit():  # not '²', which int() refuses
            return int(value) if len(value.strip()) <= 18 else None  # beyond: no time
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    else:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _finish_factory(
    factory: FactoryConfig, raw: Located, problems: Problems, hostname: str | None, cpus: int | None
) -> FactoryConfig:
    usable = cpus if cpus is not None else usable_cpus()
    total = factory.total_processors or usable
    if factory.total_processors > usable:
        problems.add(
            raw.where_of("total_processors"),
            "factory.total_processors",
            f"expected at most the {usable} CPUs this process may use, "
            f"got {factory.total_processors}",
        )
    host = factory.hostname or (hostname if hostname is not None else socket.getfqdn())
    if not re.fullmatch(FQDN_PATTERN, host):
        problems.add(
            raw.where_of("hostname"),
            "factory.hostname",
            f"expected {FQDN_TEXT} (this host calls itself {host!r}; set factory.hostname)",
        )
    if factory.factories and not {".", host} & set(factory.factories):
        problems.add(
            raw.where_of("factories"),
            "factory.factories",
            f"expected to include this factory ({host} or '.')",
        )
    clash = sorted(STANDARD_MACHINEFEATURES & set(factory.machinefeatures_options))
    if clash:
        problems.add(
            raw.where_of("machinefeatures_options"),
            "factory.machinefeatures_options",
            f"expected extra keys only; {', '.join(clash)} is a standard machinefeatures key",
        )
    shutdown = factory.shutdown_time
    if "shutdown_time" in raw and raw["shutdown_time"] is not None:
        shutdown = parse_time(raw["shutdown_time"])
        if shutdown is None:
            problems.add(
                raw.where_of("shutdown_time"),
                "factory.shutdown_time",
                f"expected a Unix time or ISO 8601 time, got {raw['shutdown_time']!r}",
            )
    return replace(factory, total_processors=total, hostname=host, shutdown_time=shutdown)


def _finish_machinetype(
    mt: MachinetypeConfig, raw: Located, problems: Problems
) -> MachinetypeConfig:
    path = f"machinetypes.{mt.name}"
    if mt.max_processors < mt.min_processors:
        problems.add(
            raw.where_of("max_processors"),
            f"{path}.max_processors",
            f"expected at least min_processors ({mt.min_processors}), got {mt.max_processors}",
        )
    if mt.min_wallclock_seconds is not None and mt.min_wallclock_seconds > mt.max_wallclock_seconds:
        problems.add(
            raw.where_of("min_wallclock_seconds"),
            f"{path}.min_wallclock_seconds",
            f"expected at most max_wallclock_seconds ({mt.max_wallclock_seconds}), got "
            f"{mt.min_wallclock_seconds}",
        )
    if mt.user_data and "://" in mt.user_data and not mt.user_data.startswith("https://"):
        problems.add(
            raw.where_of("user_data"),
            f"{path}.user_data",
            f"expected a path or an https:// URL, got {mt.user_data!r}",
        )
    if mt.image_signing_dn is not None:
        try:
            re.compile(mt.image_signing_dn)
        except re.error as err:
            problems.add(
                raw.where_of("image_signing_dn"),
                f"{path}.image_signing_dn",
                f"expected a regular expression ({err})",
            )
    return mt


def _check_machinetype_files(
    mt: MachinetypeConfig, factory: FactoryConfig, problems: Problems, check_files: bool
) -> None:
    """Local files a machinetype needs must exist now, not when its first LM starts."""
    if not check_files:
        return
    where = Where(f"machinetypes.{mt.name}")
    files_dir = mt.files_dir or factory.state_dir / "machinetypes" / (mt.pipe or mt.name) / "files"
    wanted: list[tuple[str, Path]] = []
    if mt.user_data and "://" not in mt.user_data:
        wanted.append(("user_data", resolve_local(mt.user_data, files_dir)))
    for key, name in {**factory.user_data_files, **mt.user_data_files}.items():
        wanted.append((f"user_data_files.{key}", resolve_local(name, files_dir)))
    if mt.user_data_proxy:
        base = factory.state_dir / "machinetypes" / (mt.pipe or mt.name)
        wanted.append(("x509_cert", mt.x509_cert or base / "x509cert.pem"))
        wanted.append(("x509_key", mt.x509_key or base / "x509key.pem"))
    for key, file in wanted:
        if not os.access(file, os.R_OK) or not file.is_file():
            problems.add(
                where, f"machinetypes.{mt.name}.{key}", f"expected a readable file, {file} is not"
            )


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


#: Vac's machine_model values and the backend that runs them.
VAC_MODELS: Mapping[str, BackendName] = {
    "docker": BackendName.DOCKER,
    "singularity": BackendName.APPTAINER,
    "cernvm3": BackendName.VM,
    "cernvm4": BackendName.VM,
    "vm-raw": BackendName.VM,
}


def vac_names(cls: type[Any]) -> dict[str, str]:
    """Vac option names (and deprecated spellings) -> lmrunner field names of ``cls``.

    Families such as ``user_data_option_*`` map to their mapping field (``user_data_options``).
    """
    from lmrunner.schema import fields_of, info_of

    out: dict[str, str] = {}
    for f, _hint in fields_of(cls):
        for name in info_of(f).vac:
            out[name] = f.name
    return out


#: Vac options with no home in lmrunner, and why (shown by the reference and the importer).
VAC_NOT_CARRIED: Mapping[str, str] = {
    "volume_group": "lmrunner makes no LVM volumes; scratch is bounded by disk_gb_per_processor",
    "fix_networking": "lmrunner runs VMs with user-mode networking; there is no libvirt network",
    "forward_dev": "lmrunner runs VMs with user-mode networking; there is no libvirt network",
    "domain_type": "rejected by Vac too",
    "total_machines": "rejected by Vac too; use total_processors",
    "delete_old_files": "rejected by Vac too",
    "mb_per_machine": "ignored by Vac too; use mb_per_processor",
}
