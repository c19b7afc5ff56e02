"""Vacuum Pipes: machinetype definitions published by a VO as JSON, expanded into machinetypes.

A pipe ``PREFIX`` with entries ``{"suffix": "prod", ...}`` yields machinetypes ``PREFIX-prod``.
Precedence: a local ``machinetypes.PREFIX-SUFFIX`` section > the pipe's ``overrides`` > the JSON.
Each type's share is ``pipe target_share x entry target_share / sum of entry target_shares``.

Unlike Vac, which dropped a pipe's machinetypes whenever a due refresh failed, the last good copy
stays in use until a refresh succeeds. A rejected entry is reported and the others still load.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmrunner import atomic
from lmrunner.config import MachinetypeConfig, PipeConfig
from lmrunner.errors import PipeError
from lmrunner.fetch import FetchError, fetch_bytes
from lmrunner.schema import Problems, build
from lmrunner.vactables import VAC_MODELS, vac_names
from lmrunner.yamlsrc import Located, Where, decode_text, located_from, one_line, tree_problem

if TYPE_CHECKING:
    import requests

LOG = logging.getLogger(__name__)

#: Keys Vac accepts in a pipe's JSON entries (vac.md §2.4), plus its option families.
ACCEPTED_KEYS = frozenset(
    [
        "accounting_fqan",
        "backoff_seconds",
        "container_command",
        "cvmfs_repositories",
        "fizzle_seconds",
        "disk_gb_per_processor",
        "heartbeat_file",
        "heartbeat_seconds",
        "image_signing_dn",
        "legacy_proxy",
        "machine_model",
        "max_processors",
        "max_wallclock_seconds",
        "min_processors",
        "min_wallclock_seconds",
        "root_device",
        "root_image",
        "scratch_device",
        "suffix",
        "target_share",
        "tmp_binds",
        "user_data",
        "user_data_proxy",
    ]
)
DEFAULT_CACHE_SECONDS = 3600


@dataclass(frozen=True, slots=True)
class CachedPipe:
    """The last good copy of a pipe document."""

    url: str
    fetched_at: float
    document: Mapping[str, Any]

    @property
    def cache_seconds(self) -> int:
        value = self.document.get("cache_seconds", DEFAULT_CACHE_SECONDS)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            return DEFAULT_CACHE_SECONDS  # JSON true is no number of seconds
        return value


@dataclass(frozen=True, slots=True)
class RefreshResult:
    """What :meth:`PipeStore.refresh` did: ``fresh``, ``fetched`` or ``failed`` (old copy kept)."""

    pipe: str
    status: str
    detail: str
    cached: CachedPipe | None


class PipeStore:
    """The on-disk cache of pipe documents (``<state_dir>/pipescache/<name>.json``)."""

    def __init__(
        self,
        cache_dir: Path,
        session: requests.Session | None = None,
        *,
        verify: str | bool | None = None,
    ) -> None:
        """``verify``: requests' CA setting (:func:`lmrunner.fetch.ca_verify`); None: its own."""
        self.cache_dir = cache_dir
        self._session = session
        self.verify = verify

    @property
    def session(self) -> requests.Session:
        """Made at the first fetch: reading the cached copies (every CLI command) never pays
        for importing requests."""
        if self._session is None:
            import requests

            self._session = requests.Session()
        return self._session

    def path(self, name: str) -> Path:
        return self.cache_dir / f"{name}.json"

    def load(self, name: str) -> CachedPipe | None:
        """The cached copy, or None when there is none (or it is unusable: logged)."""
        try:
            return read_cache(self.path(name))
        except FileNotFoundError:
            return None
        except PipeError as err:
            LOG.warning("pipe %s: ignoring the cached copy: %s", name, err)
            return None

    def documents(self, pipes: Mapping[str, PipeConfig]) -> dict[str, Mapping[str, Any]]:
        """The cached document of each configured pipe that has one."""
        out: dict[str, Mapping[str, Any]] = {}
        for name, pipe in pipes.items():
            cached = self.load(name)
            if cached is not None and cached.url == pipe.url:
                out[name] = cached.document
        return out

    def refresh(
        self, pipe: PipeConfig, *, force: bool = False, at: float | None = None
    ) -> RefreshResult:
        """Fetch the pipe when its cache is older than its ``cache_seconds`` (or ``force``).

        Never raises for a failed fetch: the last good copy stays in place and is returned.
        """
        moment = time.time() if at is None else at
        cached = self.load(pipe.name)
        if cached is not None and cached.url != pipe.url:
            cached = None  # the URL changed: the old copy describes another pipe
        if not force and cached is not None and moment - cached.fetched_at < cached.cache_seconds:
            return RefreshResult(pipe.name, "fresh", "cache is fresh", cached)
        try:
            document = fetch_document(pipe, self.session, verify=self.verify)
        except PipeError as err:
            kept = "keeping the last good copy" if cached else "no copy yet: its machinetypes wait"
            LOG.warning("pipe %s: refresh failed: %s; %s", pipe.name, err, kept)
            return RefreshResult(pipe.name, "failed", f"{err}; {kept}", cached)
        fresh = CachedPipe(pipe.url, moment, document)
        payload = {"url": fresh.url, "fetched_at": fresh.fetched_at, "document": document}
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.path(pipe.name), json.dumps(payload, indent=1, sort_keys=True))
        except OSError as err:  # disk full, a folder in the way: the old copy stays the good one
            kept = "keeping the last good copy" if cached else "no copy yet: its machinetypes wait"
            LOG.warning("pipe %s: cannot store the fetched copy: %s; %s", pipe.name, err, kept)
            return RefreshResult(pipe.name, "failed", f"cannot store it: {err}; {kept}", cached)
        return RefreshResult(pipe.name, "fetched", f"fetched {pipe.url}", fresh)


def fetch_document(
    pipe: PipeConfig, session: requests.Session, *, verify: str | bool | None = None
) -> Mapping[str, Any]:
    """GET the pipe's JSON, at most ``max_bytes``, and check its shape.

    Raises:
        PipeError: one line saying what failed.
    """
    try:
        body = fetch_bytes(pipe.url, max_bytes=pipe.max_bytes, timeout=pipe.timeout_seconds,
                           session=session, verify=verify)  # fmt: skip
    except FetchError as err:
        raise PipeError(one_line(str(err))) from err
    return parse_document(body, pipe.url)


def parse_document(body: bytes, source: str) -> dict[str, Any]:
    """A pipe document (UTF-8 JSON, an object with a ``machinetypes`` list) from ``source``.

    Raises:
        PipeError: one line naming ``source`` and what is wrong (the first bad byte's offset
            when it is no UTF-8 text).
    """
    document = _parse_json(body, source)
    if not isinstance(document, dict) or not isinstance(document.get("machinetypes"), list):
        raise PipeError(f"{one_line(source)}: expected an object with a 'machinetypes' list")
    return document


def read_cache(path: Path) -> CachedPipe:
    """The cached copy in ``path`` (written by :meth:`PipeStore.refresh`).

    Raises:
        FileNotFoundError: there is none.
        PipeError: it cannot be read or is no cached copy of a pipe document (one line).
    """
    name = one_line(str(path))
    try:
        body = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as err:
        raise PipeError(f"{name}: cannot read: {err.strerror or err}") from err
    data = _parse_json(body, str(path))
    url = data.get("url") if isinstance(data, dict) else None
    fetched_at = data.get("fetched_at") if isinstance(data, dict) else None
    if (
        not isinstance(url, str)
        or isinstance(fetched_at, bool)
        or not isinstance(fetched_at, int | float)
        or not math.isfinite(fetched_at)
    ):
        raise PipeError(f"{name}: expected an object with 'url', 'fetched_at' and 'document'")
    document = data.get("document")
    if not isinstance(document, dict) or not isinstance(document.get("machinetypes"), list):
        raise PipeError(f"{name}: document: expected an object with a 'machinetypes' list")
    return CachedPipe(url, float(fetched_at), document)


def _parse_json(body: bytes, source: str) -> Any:
    """Strict JSON: UTF-8 (json.loads would also take UTF-16 and -32), no NaN or Infinity,
    no number beyond a float, and nothing :func:`~lmrunner.yamlsrc.tree_problem` refuses."""
    text = decode_text(body, source, PipeError)
    try:
        data = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError as err:
        raise PipeError(f"{one_line(source)}: not JSON: nested too deeply") from err
    except ValueError as err:
        raise PipeError(f"{one_line(source)}: not JSON: {one_line(str(err))}") from err
    problem = tree_problem(data)
    if problem:
        raise PipeError(f"{one_line(source)}: {problem}")
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is no JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is beyond any number lmrunner takes")
    return value


def check_pipe(pipe: PipeConfig, raw: Located, problems: Problems) -> bool:
    """Checks of a pipe section that the schema alone cannot express."""
    path = f"vacuum_pipes.{pipe.name}"
    ok = True
    schemes = ("https://", "http://") if pipe.allow_http else ("https://",)
    if not pipe.url.startswith(schemes):
        expected = (
            "an https:// or http:// URL"
            if pipe.allow_http
            else "an https:// URL (or allow_http: true)"
        )
        problems.add(raw.where_of("url"), f"{path}.url", f"expected {expected}, got {pipe.url!r}")
        ok = False
    overrides = raw.get("overrides")
    if isinstance(overrides, Located):
        probe = Located(overrides.where)
        for key, value in overrides.items():
            probe.put(key, value, overrides.where_of(key))
        # Overrides are machinetype options: check them as such (required keys come later).
        scratch = Problems()
        build(MachinetypeConfig, probe, f"{path}.overrides", scratch, extra={"name": "x"})
        for line in scratch.lines:
            if "required;" not in line:
                problems.lines.append(line)
                ok = False
    return ok


def expand_pipes(
    pipes: Mapping[str, PipeConfig],
    documents: Mapping[str, Mapping[str, Any]],
    local: Located,
    warnings: list[str],
) -> dict[str, Located]:
    """Machinetype sections generated by the pipes, merged with their overrides and local sections.

    Entries that break the rules are left out, each with one line in ``warnings``.
    """
    out: dict[str, Located] = {}
    for name, pipe in pipes.items():
        document = documents.get(name)
        if document is None:
            continue
        accepted: list[tuple[str, Located, float]] = []
        for index, raw_entry in enumerate(document.get("machinetypes", [])):
            origin = f"pipe {name} ({pipe.url}) entry {index}"
            converted = _entry(raw_entry, origin, pipe, warnings)
            if converted is None:
                continue
            suffix, entry = converted
            mt_name = f"{name}-{suffix}"
            if any(mt_name == f"{name}-{seen}" for seen, _, _ in accepted):
                warnings.append(f"{entry.where}: rejected: suffix '{suffix}' given twice")
                continue
            share = _share(entry.get("target_share")) or 0.0
            for key, value in pipe.overrides.items():
                _overlay(entry, key, value, Where(f"vacuum_pipes.{name}.overrides"))
            # The entry on its own (JSON + overrides) must be a valid machinetype.
            scratch = Problems()
            path = f"machinetypes.{mt_name}"
            if build(MachinetypeConfig, entry, path, scratch, extra={"name": mt_name}) is None:
                warnings.append(f"{entry.where}: rejected: {scratch.lines[0].split(': ', 1)[1]}")
                continue
            accepted.append((suffix, entry, share))
        # Shares are split over the entries that were accepted, so rejects take none.
        total = sum(share for _, _, share in accepted)
        for suffix, entry, share in accepted:
            mt_name = f"{name}-{suffix}"
            split = pipe.target_share * share / total if total else 0.0
            entry.put("target_share", split, entry.where)
            merged = Located(entry.where)
            for key, value in entry.items():
                merged.put(key, value, entry.where_of(key))
            override = local.get(mt_name)
            if isinstance(override, Located):
                for key, value in override.items():
                    _overlay(merged, key, value, override.where_of(key))
            merged.put("__pipe__", name, entry.where)
            out[mt_name] = merged
    return out


def _entry(
    entry: Any, origin: str, pipe: PipeConfig, warnings: list[str]
) -> tuple[str, Located] | None:
    """One JSON entry in lmrunner's names, or None (with a warning) when it breaks the rules."""
    if not isinstance(entry, dict):
        warnings.append(f"{origin}: rejected: expected an object")
        return None
    suffix = entry.get("suffix")
    # ASCII only: str.isalnum() also takes letters like 'ß' that no machinetype name may hold.
    if not isinstance(suffix, str) or not re.fullmatch(r"[A-Za-z0-9-]+", suffix):
        warnings.append(f"{origin}: rejected: 'suffix' must be a name of letters, digits and '-'")
        return None
    where = Where(f"{origin} '{suffix}'")
    names = vac_names(MachinetypeConfig)
    out = Located(where)
    options: dict[str, str] = {}
    files: dict[str, str] = {}
    for key, value in entry.items():
        if key == "suffix":
            continue
        if key.startswith("user_data_option_"):
            options[key.removeprefix("user_data_option_")] = value
        elif key.startswith("user_data_file_"):
            files[key.removeprefix("user_data_file_")] = value
        elif key in ACCEPTED_KEYS:
            out.put(names.get(key) or key, located_from(value, where), where)
        else:
            LOG.info("%s: ignoring key %r (not accepted from pipes)", origin, key)
    if options:
        out.put("user_data_options", located_from(options, where), where)
    if files:
        out.put("user_data_files", located_from(files, where), where)
    model = out.get("backend")
    if isinstance(model, str) and model in VAC_MODELS:
        out.put("backend", VAC_MODELS[model].value, where)
    elif model is None:
        out.put("backend", VAC_MODELS["cernvm3"].value, where)  # Vac's default machine_model
    share = _share(out.get("target_share"))
    if share is None:
        warnings.append(
            f"{where}: rejected: target_share must be a number >= 0, got {out['target_share']!r}"
        )
        return None
    out.put("target_share", share, where)  # missing or null counts as 0, as in Vac
    problem = _unsafe(out, files, pipe)
    if problem:
        warnings.append(f"{where}: rejected: {problem}")
        return None
    return suffix.lower(), out


def _unsafe(entry: Located, files: Mapping[str, Any], pipe: PipeConfig) -> str | None:
    """Vac's path-safety rules for what a remote document may point at (vac.md §2.4)."""
    web = ("https://", "http://") if pipe.allow_http else ("https://",)
    for key, value in files.items():
        if not isinstance(value, str) or "/" in value:
            return f"user_data_file_{key} may not contain '/'"
    repos = entry.get("cvmfs_repositories")
    for repo in repos if isinstance(repos, list) else str(repos or "").split():
        if "/" in str(repo):
            return "cvmfs_repositories may not contain '/'"
    if "/" in str(entry.get("heartbeat_file") or ""):
        return "heartbeat_file may not contain '/'"
    user_data = str(entry.get("user_data") or "")
    if "/../" in user_data or ("/" in user_data and not user_data.startswith(web)):
        return f"user_data {user_data!r} must be a plain file name or an https URL"
    image = str(entry.get("image") or "")
    if "/../" in image or ("/" in image and not image.startswith(("docker://", "/cvmfs/", *web))):
        return f"root_image {image!r} must be a file name, docker://, /cvmfs/ or https"
    return None


def _share(value: Any) -> float | None:
    """An entry's target_share as a finite number >= 0 (missing or null: 0), else None."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        share = float(value)
    except ValueError:
        return None
    return share if math.isfinite(share) and share >= 0 else None


def _overlay(into: Located, key: str, value: Any, where: Where) -> None:
    """Set ``key``; option families (user_data_options/files) merge name by name, as in Vac."""
    old = into.get(key)
    if (
        key in ("user_data_options", "user_data_files")
        and isinstance(old, Mapping)
        and isinstance(value, Mapping)
    ):
        merged = Located(where)
        for name, item in old.items():
            merged.put(name, item, old.where_of(name) if isinstance(old, Located) else where)
        for name, item in value.items():
            merged.put(name, item, where)
        into.put(key, merged, where)
    else:
        into.put(key, value, where)
