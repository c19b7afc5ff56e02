"""What a logical machine is given: user_data, machine/job features, joboutputs, and their mounts.

For each LM the core prepares one directory (its files are bind-mounted or shared into the LM)
and hands the backend the list of :class:`~lmrunner.model.Mount` and the environment; backends
never build these paths themselves. In-LM paths follow Vac (the backend's ``PLACEMENT``) so
existing payloads work unchanged. Formats: vac.md §5 (templating), §6 (MJF, HSF-TN-2016-02), §7.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid as uuid_mod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from lmrunner import __version__, atomic, proxy
from lmrunner.config import (
    Config,
    MachinetypeConfig,
    MjfEnvStyle,
    effective_disk_gb,
    resolve_local,
)
from lmrunner.errors import LmrunnerError
from lmrunner.fetch import FetchError, ca_verify, fetch_bytes
from lmrunner.model import MIB, Limits, Mount, Placement

if TYPE_CHECKING:
    import requests

LOG = logging.getLogger(__name__)

#: Every pattern left after substitution is removed (Vac's rule).
LEFTOVER = re.compile(r"##user_data_[a-z0-9_,]*##")
#: Option names whose values are treated as secrets when user_data is shown to an admin.
SECRET_NAME = re.compile(r"pass|secret|token|key|cred|proxy", re.IGNORECASE)
USER_DATA_MAX_BYTES = 4 * MIB
USER_DATA_TIMEOUT = 30.0


class PayloadError(LmrunnerError):
    """An LM's payload (its user_data or its folders) could not be prepared."""


@dataclass(frozen=True, slots=True)
class LmIdentity:
    """Who an LM is: its name (also its hostname), uuid (also MJF job_id) and machinetype."""

    name: str
    uuid: str
    machinetype: str


@dataclass(frozen=True, slots=True)
class Prepared:
    """The result of :func:`prepare`: what the backend needs to start the LM."""

    directory: Path
    mounts: tuple[Mount, ...]
    env: Mapping[str, str]
    limits: Limits
    shutdown_time: int


def lm_name(factory_hostname: str, slot: int) -> str:
    """Vac's LM name for a slot: ``<host>-NN.<domain>`` (slot 3 of vac01.example.com:
    ``vac01-03.example.com``)."""
    host, _, domain = factory_hostname.partition(".")
    return f"{host}-{slot:02d}.{domain}" if domain else f"{host}-{slot:02d}"


def new_identity(name: str, machinetype: str) -> LmIdentity:
    return LmIdentity(name=name, uuid=str(uuid_mod.uuid4()), machinetype=machinetype)


def limits_for(config: Config, mt: MachinetypeConfig, processors: int) -> Limits:
    """The LM's resources, from the factory's per-processor values (vac.md §3.5)."""
    factory = config.factory
    return Limits(
        processors=processors,
        memory_bytes=factory.mb_per_processor * processors * MIB,
        swap_bytes=factory.swap_mb_per_processor * processors * MIB,
        # Round per processor: int(0.7 * 3 * 10**9) would be 2099999999.
        disk_bytes=round(effective_disk_gb(mt, factory) * 10**9) * processors,
        hs06=None
        if factory.hs06_per_processor is None
        else factory.hs06_per_processor * processors,
        pids=factory.pids_per_processor * processors,
    )


# --- environment and URLs -------------------------------------------------------------------


def mjf_locations(placement: Placement, style: MjfEnvStyle) -> dict[str, str]:
    """``MACHINEFEATURES``/``JOBFEATURES``/``JOBOUTPUTS`` as the payload should see them.

    ``path`` gives plain paths (shell ``cat $JOBFEATURES/x`` and Python ``open()`` work);
    ``file_url`` gives ``file://`` URLs (``urllib.request.urlopen()`` works, as DIRAC reads MJF,
    but ``cat`` does not). ``http`` (and ``auto`` where the backend serves them, as Vac's VMs
    had) gives the metadata service's URLs: ``urlopen()`` and ``curl`` work, ``cat`` does not.
    The ``##user_data_*_url##`` values are the same strings.
    """
    paths = {
        "MACHINEFEATURES": placement.machinefeatures,
        "JOBFEATURES": placement.jobfeatures,
        "JOBOUTPUTS": placement.joboutputs,
    }
    if style is MjfEnvStyle.HTTP or (style is MjfEnvStyle.AUTO and placement.mjf_url):
        if not placement.mjf_url:
            raise PayloadError(f"mjf_env_style {style}: this backend serves no metadata over HTTP")
        return {key: f"{placement.mjf_url}/{path.name}" for key, path in paths.items()}
    if style is MjfEnvStyle.FILE_URL:
        return {key: f"file://{path}" for key, path in paths.items()}
    return {key: str(path) for key, path in paths.items()}


# --- user_data ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TemplateValues:
    """Substitutions for ``##user_data_*##`` patterns; ``secrets`` name those never to show."""

    values: Mapping[str, str]
    secrets: frozenset[str]

    def masked(self) -> dict[str, str]:
        return {
            key: (f"<secret {key}: {len(value)} bytes, shown with --show-secrets>")
            if key in self.secrets
            else value
            for key, value in self.values.items()
        }


def template_values(
    config: Config,
    mt: MachinetypeConfig,
    lm: LmIdentity,
    placement: Placement,
    *,
    user_data_url: str | None,
    proxy_pem: str | None,
) -> TemplateValues:
    """Every ``##user_data_*##`` value of vac.md §5.2, including deprecated spellings."""
    factory = config.factory
    urls = mjf_locations(placement, mt.mjf_env_style)
    values: dict[str, str] = {
        "url": user_data_url or "",
        "space": factory.space,
        "machinetype": mt.name,
        "vmtype": mt.name,
        "machine_hostname": lm.name,
        "vm_hostname": lm.name,
        "manager_version": f"lmrunner {__version__}",
        "vmlm_version": f"lmrunner {__version__}",
        "manager_hostname": factory.hostname,
        "vmlm_hostname": factory.hostname,
        "machinefeatures_url": urls["MACHINEFEATURES"],
        "jobfeatures_url": urls["JOBFEATURES"],
        "joboutputs_url": urls["JOBOUTPUTS"],
        "root_image_url": mt.image if mt.image.startswith(("https://", "http://")) else "",
        "uuid": lm.uuid,
        "site": factory.gocdb_sitename or "",
    }
    secrets: set[str] = set()
    files_dir = config.files_dir(mt.name)
    # Machinetype values override the factory's; a file overrides an option of the same name.
    for level in (factory, mt):
        for name, value in level.user_data_options.items():
            values[f"option_{name}"] = value
            if SECRET_NAME.search(name):
                secrets.add(f"option_{name}")
        for name, file in level.user_data_files.items():
            text = _read(resolve_local(file, files_dir), f"machinetypes.{mt.name}.user_data_files")
            values[f"option_{name}"] = text
            values[f"file_{name}"] = text  # deprecated spelling, same contents
            secrets.update({f"option_{name}", f"file_{name}"})
    if proxy_pem is not None:
        values["option_x509_proxy"] = proxy_pem
        secrets.add("option_x509_proxy")
    return TemplateValues({f"user_data_{k}": v for k, v in values.items()},
                          frozenset(f"user_data_{k}" for k in secrets))  # fmt: skip


def render_user_data(template: str, values: Mapping[str, str]) -> str:
    """Replace ``##NAME##`` for every NAME in ``values``, then remove leftover patterns."""
    text = template
    for key, value in values.items():
        text = text.replace(f"##{key}##", value)
    return LEFTOVER.sub("", text)


def read_template(
    config: Config, mt: MachinetypeConfig, session: requests.Session | None = None
) -> tuple[str, str | None]:
    """The machinetype's user_data template and the URL it came from (None for a file)."""
    if mt.user_data is None:
        return "", None
    factory = config.factory
    if mt.user_data.startswith(("https://", "http://")):
        try:
            body = fetch_bytes(
                mt.user_data,
                max_bytes=USER_DATA_MAX_BYTES,
                timeout=min(USER_DATA_TIMEOUT, factory.download_timeout_seconds),
                session=session,
                verify=ca_verify(factory.ca_path),
                allow_http=factory.allow_http,
            )
        except FetchError as err:
            kept = _last_good_user_data(config, mt.user_data)
            if kept is None:
                raise PayloadError(f"machinetypes.{mt.name}.user_data: {err}") from err
            # As with images and pipes: a server down for a while does not stop the site.
            LOG.warning("machinetype=%s: user_data: %s; using the last good copy", mt.name, err)
            body = kept
        else:
            _keep_user_data(config, mt.user_data, body)
        return body.decode(errors="replace"), mt.user_data
    path = resolve_local(mt.user_data, config.files_dir(mt.name))
    return _read(path, f"machinetypes.{mt.name}.user_data"), None


def _user_data_copy(config: Config, url: str) -> Path:
    return config.factory.state_dir / "userdata" / hashlib.sha256(url.encode()).hexdigest()


def _keep_user_data(config: Config, url: str, body: bytes) -> None:
    """Keep the template fetched from ``url`` (it may hold secrets: root's alone)."""
    path = _user_data_copy(config, url)
    try:
        if path.exists() and path.read_bytes() == body:
            return
        path.parent.mkdir(mode=0o700, exist_ok=True)
        atomic.write_bytes(path, body, mode=0o600)
    except OSError as err:  # a copy not kept is no reason to fail this start
        LOG.warning("cannot keep a copy of user_data %s: %s", url, err)


def _last_good_user_data(config: Config, url: str) -> bytes | None:
    try:
        return _user_data_copy(config, url).read_bytes()
    except OSError:
        return None


def make_proxy(config: Config, mt: MachinetypeConfig, shutdown_time: int) -> str | None:
    """The RFC 3820 limited proxy for ``##user_data_option_x509_proxy##``, when asked for."""
    if not mt.user_data_proxy:
        return None
    base = config.machinetype_dir(mt.name)
    return proxy.make_limited_proxy(
        mt.x509_cert or base / "x509cert.pem",
        mt.x509_key or base / "x509key.pem",
        not_after=shutdown_time,
        name=mt.name,
        legacy=mt.legacy_proxy,
    )


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError as err:
        raise PayloadError(f"{what}: cannot read {path}: {err.strerror}") from err


# --- machine/job features -------------------------------------------------------------------


def features(
    config: Config,
    mt: MachinetypeConfig,
    lm: LmIdentity,
    limits: Limits,
    *,
    created: int,
    shutdown_time: int,
) -> tuple[dict[str, str], dict[str, str]]:
    """The machinefeatures and jobfeatures files (HSF-TN-2016-02 plus Vac's extra keys).

    Unlike Vac, ``grace_secs``, ``grace_secs_job``, ``max_swap_bytes`` and
    ``scratch_limit_bytes`` are given, from the LM's real limits.
    """
    wall = max(shutdown_time - created, 0)
    processors = str(limits.processors)
    machine = {
        "total_cpu": processors,
        "shutdowntime": str(shutdown_time),
        "grace_secs": str(mt.stop_grace_seconds),
        "phys_cores": processors,  # deprecated keys, still read by old payloads
        "log_cores": processors,
        "jobslots": "1",
    }
    job = {
        "allocated_cpu": processors + "\n",  # Vac wrote it with a newline; payloads cope
        "allocated_CPU": processors + "\n",
        "shutdowntime_job": str(shutdown_time),
        "grace_secs_job": str(mt.stop_grace_seconds),
        "jobstart_secs": str(created),
        "job_id": lm.uuid,
        "wall_limit_secs": str(wall),
        "wall_limit_secs_lrms": str(wall),
        "cpu_limit_secs": str(wall * limits.processors),
        "cpu_limit_secs_lrms": str(wall * limits.processors),
        "cpufactor_lrms": "1.0",
        "max_rss_bytes": str(limits.memory_bytes),
        "mem_limit_MB": str(limits.memory_bytes // 1_000_000),  # decimal MB (deprecated key)
        "max_swap_bytes": str(limits.swap_bytes),
        "scratch_limit_bytes": str(limits.disk_bytes),
    }
    if limits.hs06 is not None:
        machine["hs06"] = _number(limits.hs06)
        job["hs06_job"] = _number(limits.hs06)
    for name, value in config.factory.machinefeatures_options.items():
        machine.setdefault(name, value)  # options never override the standard keys
    return machine, job


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}"


def write_features(directory: Path, files: Mapping[str, str], *, durable: bool = True) -> None:
    directory.mkdir(mode=0o755, exist_ok=True)
    for key, value in files.items():
        atomic.write_text(directory / key, value, durable=durable)


def update_shutdowntime(lm_dir: Path, shutdown_time: int) -> bool:
    """Lower the LM's ``shutdowntime``/``shutdowntime_job`` in place when ``shutdown_time`` is
    earlier; the LM sees the change at once (its folders are shared, and writes are atomic).

    Returns whether anything changed.
    """
    changed = False
    for file in (
        lm_dir / "machinefeatures" / "shutdowntime",
        lm_dir / "jobfeatures" / "shutdowntime_job",
    ):
        try:
            current = int(file.read_text().strip())
        except (OSError, ValueError):
            current = None
        if current is None or shutdown_time < current:
            atomic.write_text(file, str(shutdown_time))
            changed = True
    return changed


# --- the whole directory ----------------------------------------------------------------------


def prepare(
    config: Config,
    mt: MachinetypeConfig,
    lm: LmIdentity,
    *,
    placement: Placement,
    limits: Limits,
    created: int,
    shutdown_time: int,
    lm_dir: Path,
    owner: tuple[int, int],
    disk: Path | None = None,
    session: requests.Session | None = None,
) -> Prepared:
    """Create the LM's directory and everything in it; return the mounts and environment.

    Args:
        placement: where the LM's backend puts these files inside the LM.
        limits: the LM's resources (:func:`limits_for`, resolved once by the caller, which gives
            the same to its record, its cgroup and its backend).
        disk: the LM's own filesystem, mounted at ``lm_dir/mnt`` already
            (:mod:`lmrunner.lmdisks`): joboutputs and the tmp_binds folders go there. None:
            they go into ``lm_dir``, unbounded.
        owner: uid and gid the LM runs as: its joboutputs, tmp_binds folders and a user_data
            holding secrets belong to it; everything else is root's and read-only to the LM.

    Raises:
        PayloadError: user_data or a file it needs cannot be read or fetched.
        ProxyError: the proxy cannot be made.
    """
    lm_dir.mkdir(mode=0o755, parents=True, exist_ok=disk is not None)
    try:
        template, url = read_template(config, mt, session)
        proxy_pem = make_proxy(config, mt, shutdown_time)
        values = template_values(config, mt, lm, placement, user_data_url=url, proxy_pem=proxy_pem)
        text = render_user_data(template, values.values)
        secret = any(values.values[key] and f"##{key}##" in template for key in values.secrets) or (
            proxy_pem is not None
        )
        # 0755 so the default container_command (/user_data) runs. With a key or proxy inside it is
        # the LM account's alone: 0700 (0600 plus the execute bit that command needs).
        atomic.write_text(lm_dir / "user_data", text, mode=0o700 if secret else 0o755,
                          owner=owner if secret else None, durable=False)  # fmt: skip

        machine, job = features(
            config, mt, lm, limits, created=created, shutdown_time=shutdown_time
        )
        # No fsync per file: until the LM starts nobody reads them, and a crash before that discards
        # the whole directory (a half-created LM); starts are on the factory's hot path.
        write_features(lm_dir / "machinefeatures", machine, durable=False)
        write_features(lm_dir / "jobfeatures", job, durable=False)
        joboutputs = (disk or lm_dir) / "joboutputs"
        joboutputs.mkdir(mode=0o755)
        _chown(joboutputs, owner)

        mounts = [
            Mount(lm_dir / "user_data", placement.user_data, read_only=True),
            Mount(lm_dir / "machinefeatures", placement.machinefeatures, read_only=True),
            Mount(lm_dir / "jobfeatures", placement.jobfeatures, read_only=True),
            Mount(joboutputs, placement.joboutputs, read_only=False),
        ]
        if mt.cvmfs_repositories:
            mounts.append(Mount(Path("/cvmfs"), placement.cvmfs, read_only=True))
        if mt.tmp_binds:
            mnt = disk or lm_dir / "mnt"
            mnt.mkdir(mode=0o755, exist_ok=True)
            for index, target in enumerate(mt.tmp_binds):
                folder = mnt / f"tmp{index}"
                folder.mkdir(mode=0o755)
                _chown(folder, owner)
                mounts.append(Mount(folder, PurePosixPath(target), read_only=False))
        env = mjf_locations(placement, mt.mjf_env_style)
        return Prepared(lm_dir, tuple(mounts), env, limits, shutdown_time)
    except BaseException:
        shutil.rmtree(lm_dir, ignore_errors=True)  # no half-made LM directory stays behind
        raise


def _chown(path: Path, owner: tuple[int, int]) -> None:
    try:
        os.chown(path, *owner)
    except PermissionError as err:
        raise PayloadError(f"cannot give {path} to uid {owner[0]}: {err.strerror}") from err
