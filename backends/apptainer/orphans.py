"""Finding an LM's processes by its labels, for LMs whose record was lost (orphans).

Apptainer rewrites the argv and environment of its processes (``starter``, ``appinit``), so the
labels that let ``list_owned`` recognise an LM whose record was lost are passed in the LM's
environment (``LMRUNNER_*``, written into its env file): they appear in the engine configuration
apptainer keeps in its own processes' environment (``ENGINE_CONFIG1..N``) and, as plain
variables, in the payload's.

The processes and their environments are psutil's (:func:`processes_of`); their identity is
:func:`lmrunner.process.identify`'s (pid and start time, as in every handle).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from lmrunner.backends.apptainer.paths import is_uuid
from lmrunner.backends.base import LABEL_FACTORY, LABEL_NAME, LABEL_UUID
from lmrunner.process import ProcessId, identify

LOG = logging.getLogger(__name__)

#: The labels, as environment variables of the LM (recognised by list_owned).
LABEL_ENV = {
    LABEL_FACTORY: "LMRUNNER_FACTORY",
    LABEL_NAME: "LMRUNNER_LM_NAME",
    LABEL_UUID: "LMRUNNER_LM_UUID",
}
#: Set in the LM with the labels, so that another backend's processes of the same account (QEMU
#: runs as sc_user too) are never taken for an Apptainer LM's.
BACKEND_ENV = "LMRUNNER_BACKEND"
ENGINE_CONFIG = "ENGINE_CONFIG"

#: An LM's labels (``LMRUNNER_*`` variable -> value) and its processes, by LM uuid.
Labelled = dict[str, tuple[dict[str, str], list[ProcessId]]]


def processes_of(uid: int) -> list[tuple[ProcessId, dict[str, str]]]:
    """Every live process whose real uid is ``uid``, with its environment.

    A process that ends or turns zombie while it is looked at, whose pid is reused meanwhile, or
    whose files cannot be read is left out: psutil's NoSuchProcess, ZombieProcess and
    AccessDenied (and an OSError it lets through) stop here. psutil stops reading an environment
    at an empty entry; a payload can rewrite its own environment anyway, so orphans are known by
    apptainer's processes, whose engine configuration the payload cannot change.
    """
    import psutil  # imported here: only the orphan scan needs it (`lmrunner user-data` does not)

    try:
        pids = psutil.pids()
    except OSError as err:
        LOG.warning("apptainer: cannot list processes: %s", err)
        return []
    found: list[tuple[ProcessId, dict[str, str]]] = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.uids().real != uid:
                continue
            environ = proc.environ()
            process = identify(pid)
            if process is None or not proc.is_running():
                continue  # ended, a zombie, or the pid names another process by now
        except (psutil.Error, OSError):
            continue  # it ended meanwhile, or is not ours to read
        found.append((process, environ))
    return found


def labelled(processes: Iterable[tuple[ProcessId, Mapping[str, str]]], backend: str) -> Labelled:
    """The processes (of sc_user) carrying ``backend``'s labels with a valid LM uuid and a
    factory, by LM uuid."""
    found: Labelled = {}
    for process, environ in processes:
        labels = labels_in_environ(environ)
        if not labels or labels.get(BACKEND_ENV) != backend:
            continue
        uuid = labels.get(LABEL_ENV[LABEL_UUID], "")
        if not is_uuid(uuid) or LABEL_ENV[LABEL_FACTORY] not in labels:
            continue
        found.setdefault(uuid, (labels, []))[1].append(process)
    return found


def labels_in_environ(environ: Mapping[str, str]) -> dict[str, str] | None:
    """lmrunner's labels from a process's environment, or None when it has none.

    A payload process has them as plain variables; apptainer's own processes (``starter``,
    ``appinit``) carry them inside the engine configuration JSON (``ENGINE_CONFIG1..N``).
    """
    names = (*LABEL_ENV.values(), BACKEND_ENV)
    if LABEL_ENV[LABEL_UUID] in environ:
        return {key: _text(environ[key]) for key in names if key in environ}
    chunks: dict[int, str] = {}
    for key, value in environ.items():
        number = key[len(ENGINE_CONFIG) :]
        if key.startswith(ENGINE_CONFIG) and number.isascii() and number.isdigit():
            chunks[int(number)] = value
    text = "".join(chunks[i] for i in sorted(chunks))
    if LABEL_ENV[LABEL_UUID] not in text:
        return None
    try:
        config = json.loads(text)
        found = next(
            (d for d in _dicts(config) if isinstance(d.get(LABEL_ENV[LABEL_UUID]), str)), None
        )
    except (ValueError, RecursionError):  # not JSON, or nested deeper than any engine's config
        return None
    if found is None:
        return None
    return {k: _text(found[k]) for k in names if isinstance(found.get(k), str)}


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for item in value.values():
            yield from _dicts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _dicts(item)


def _text(value: str) -> str:
    """A value as valid text: bytes that were not UTF-8 (kept by the file system's decoding as
    lone surrogates) become U+FFFD, so a label can be logged and stored."""
    try:
        data = value.encode(errors="surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file held (a ``\ud800`` escape in JSON)
        data = value.encode(errors="surrogatepass")
    return data.decode(errors="replace")
