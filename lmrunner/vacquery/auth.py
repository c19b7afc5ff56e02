"""Authenticated VacQuery between lmrunner factories: HMAC-SHA256 with the space's secret.

Vac's protocol has no authentication (vac.md §8.2): anyone who can send a UDP datagram can
claim to be a factory running every LM of a machinetype, or an abort that backs it off
space-wide. With ``factory.space_secret_file`` set, lmrunner signs what it sends and plans only
with what is signed:

- a message carries ``lmrunner_time`` (when it was signed) and ``lmrunner_hmac``, the
  HMAC-SHA256 of its canonical JSON (sorted keys, no spaces) without ``lmrunner_hmac``. Both
  are extra keys, which Vac's readers ignore, so a signed reply is still a valid Vac reply;
- a message signed more than :data:`WINDOW_SECONDS` away from now is refused (replay by time);
- a reply must echo the cookie made for this round from a fresh salt (replay of an old reply);
- a request names the factory it is for (``lmrunner_to``, signed): replayed to another member
  it gets no answer; the factory it was for answers its cookie to one source address only, at
  most :data:`RESENDS` times (a client's retransmissions), so a captured request replayed from
  elsewhere, or again and again, gets no answer (reflection).

Without ``factory.space_answer_vac`` a signing factory answers nothing unsigned; with it, it
also answers Vac's plain queries with plain replies (read-only: Vac sees this factory's LMs,
while Vac's replies never change this factory's decisions).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmrunner.errors import ConfigError
from lmrunner.yamlsrc import one_line

LOG = logging.getLogger(__name__)
TIME_KEY = "lmrunner_time"
HMAC_KEY = "lmrunner_hmac"
#: A signed request names the factory it is for: replayed to another, it gets no answer.
TO_KEY = "lmrunner_to"
#: A signed message older or newer than this (clock skew included) is refused.
WINDOW_SECONDS = 60.0
#: Times one request cookie is answered (the client's first send and its retransmissions).
RESENDS = 6
#: The shortest secret taken (bytes, after surrounding whitespace is removed).
MIN_SECRET = 16
#: Request cookies remembered at most (two minutes of a 500-factory space fit).
MAX_COOKIES = 65536
MAX_SECRET_FILE = 4096


def load_secret(path: Path) -> bytes:
    """The space secret from ``path``: a regular file owned by this user (root), readable by
    it alone (0600 or stricter), of 16 bytes or more. :class:`ConfigError` names the problem."""
    shown = one_line(str(path))  # a name with a line break must not split the message
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise ConfigError(f"{shown}: cannot open the space secret: {err.strerror}") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{shown}: the space secret must be a regular file")
        if info.st_uid != os.geteuid():
            raise ConfigError(
                f"{shown}: the space secret must be owned by uid {os.geteuid()}, not {info.st_uid}"
            )
        if info.st_mode & 0o077:
            raise ConfigError(
                f"{shown}: the space secret must be readable by its owner only (mode 0600), "
                f"not {stat.S_IMODE(info.st_mode):04o}"
            )
        data = os.read(fd, MAX_SECRET_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_FILE:
        raise ConfigError(f"{shown}: the space secret is over {MAX_SECRET_FILE} bytes")
    secret = data.strip()
    if len(secret) < MIN_SECRET:
        raise ConfigError(
            f"{shown}: the space secret must hold at least {MIN_SECRET} bytes, "
            f"got {len(secret)} (e.g. openssl rand -hex 32 > {shown})"
        )
    return secret


def canonical(message: Mapping[str, Any]) -> bytes:
    """What is signed: the message without its HMAC, in one spelling both ends make."""
    body = {key: value for key, value in message.items() if key != HMAC_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def is_signed(message: Mapping[str, Any]) -> bool:
    return HMAC_KEY in message or TIME_KEY in message


@dataclass
class _Seen:
    source: str
    first: float
    count: int = 1


@dataclass
class SpaceAuth:
    """Signs and checks messages with one space secret."""

    secret: bytes = field(repr=False)
    answer_vac: bool = False
    clock: Callable[[], float] = time.time
    _cookies: dict[str, _Seen] = field(default_factory=dict, repr=False)

    def sign(self, message: dict[str, Any], to: str | None = None) -> dict[str, Any]:
        """Sign in place (``to``: the factory a request is for, signed with the rest)."""
        if to is not None:
            message[TO_KEY] = to
        message[TIME_KEY] = round(self.clock(), 3)
        message[HMAC_KEY] = self._mac(message)
        return message

    def verify(self, message: Mapping[str, Any]) -> bool:
        """Signed with this secret, within the time window."""
        mac, when = message.get(HMAC_KEY), message.get(TIME_KEY)
        if not isinstance(mac, str) or len(mac) != 64 or not mac.isascii():
            return False
        if isinstance(when, bool) or not isinstance(when, int | float):
            return False
        try:
            if not abs(self.clock() - float(when)) <= WINDOW_SECONDS:  # NaN fails too
                return False
            expected = self._mac(message)
        except (TypeError, ValueError, OverflowError, RecursionError):  # hostile values
            return False
        return hmac.compare_digest(expected, mac)

    def fresh_request(self, cookie: str, source: str) -> bool:
        """A verified request's cookie, first seen from ``source`` and not answered too often.
        Called after :meth:`verify`, so only signed cookies fill the table."""
        now = self.clock()
        # Forget, oldest first, what is out of the window (dicts keep insertion order: each
        # request costs what it removes, not the table's size), and never hold more than
        # MAX_COOKIES.
        while self._cookies:
            oldest = next(iter(self._cookies))
            first = self._cookies[oldest].first
            if now - first <= 2 * WINDOW_SECONDS and len(self._cookies) < MAX_COOKIES:
                break
            del self._cookies[oldest]
        seen = self._cookies.get(cookie)
        if seen is None or now - seen.first > 2 * WINDOW_SECONDS:
            self._cookies[cookie] = _Seen(source, now)
            return True
        if seen.source != source or seen.count >= RESENDS:
            return False
        seen.count += 1
        return True

    def _mac(self, message: Mapping[str, Any]) -> str:
        return hmac.new(self.secret, canonical(message), hashlib.sha256).hexdigest()


def from_config(
    secret_file: Path | None, answer_vac: bool, clock: Callable[[], float] = time.time
) -> SpaceAuth | None:
    """The space's :class:`SpaceAuth`, None when the space is plain Vac (no secret file)."""
    if secret_file is None:
        return None
    return SpaceAuth(load_secret(secret_file), answer_vac, clock)


class AuthFor:
    """The :class:`SpaceAuth` of the current configuration, made again when the secret file
    or the options change (a rotated secret takes effect at once). A secret that cannot be
    read any more fails closed: a random one, which nothing verifies, with the problem logged
    once."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._key: tuple[object, ...] | None = None
        self._auth: SpaceAuth | None = None

    def __call__(self, secret_file: Path | None, answer_vac: bool) -> SpaceAuth | None:
        key: tuple[object, ...] = (secret_file, answer_vac)
        if secret_file is not None:
            try:
                info = secret_file.lstat()
                key += (info.st_ino, info.st_mtime_ns, info.st_size, info.st_mode, info.st_uid)
            except OSError as err:
                key += (err.errno,)
        if key != self._key:
            try:
                self._auth = from_config(secret_file, answer_vac, self.clock)
            except ConfigError as err:
                LOG.error("space: %s; nothing is signed or trusted until it is fixed", err)
                self._auth = SpaceAuth(os.urandom(32), False, self.clock)
            self._key = key
        return self._auth
