"""Size- and time-limited HTTP GETs (Vacuum Pipes, remote user_data templates) and the
redirect-checked streamed GET the image cache downloads through."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from lmrunner import __version__
from lmrunner.errors import LmrunnerError

if TYPE_CHECKING:  # requests costs ~50 ms to import: commands that never fetch skip it
    import requests

#: The grid's CA folder (hashed certificates), used for https when no ca_path is configured.
GRID_CA_DIR = Path("/etc/grid-security/certificates")

#: Redirects followed by :func:`open_stream` before it gives up.
MAX_REDIRECTS = 10


class FetchError(LmrunnerError):
    """A URL could not be fetched; the message says which and why, in one line."""


def ca_verify(ca_path: Path | None) -> str | bool:
    """requests' ``verify=`` for the configured ``ca_path`` (a PEM bundle or a hashed folder):
    the grid's CA folder when none is configured and it exists, else requests' own CAs."""
    if ca_path is not None:
        return str(ca_path)
    return str(GRID_CA_DIR) if GRID_CA_DIR.is_dir() else True


def url_problem(url: str, *, allow_http: bool) -> str | None:
    """Why ``url`` may not be fetched (one line), None when it may: https always, http only
    with ``allow_http``, nothing else."""
    schemes = ("https", "http") if allow_http else ("https",)
    try:
        parts = urlsplit(url)
    except ValueError as err:
        return f"{url!r}: not a URL: {err}"
    if parts.scheme.lower() not in schemes or not parts.hostname:
        wanted = "an https:// or http:// URL" if allow_http else "an https:// URL (or allow_http)"
        return f"{url!r}: expected {wanted}"
    if not url.isprintable() or " " in url:
        return f"{url!r}: a URL has no spaces or control characters"
    return None


def open_stream(
    client: requests.Session,
    url: str,
    *,
    allow_http: bool,
    timeout: float,
    headers: dict[str, str] | None = None,
    verify: str | bool | None = None,
) -> requests.Response:
    """A streamed GET of ``url`` following redirects one hop at a time, each hop checked
    before it is requested: a scheme :func:`url_problem` refuses, or http after https, is never
    contacted (requests' own redirects would send the request first and let us look after).

    The caller closes the response (``with``).

    Raises:
        FetchError: a refused URL or redirect, too many redirects.
        requests.RequestException: the network or the server failed.
    """
    sent = {"User-Agent": f"lmrunner/{__version__}", **(headers or {})}
    current, secure = url, False
    for _ in range(MAX_REDIRECTS + 1):
        problem = url_problem(current, allow_http=allow_http)
        if problem is not None:
            raise FetchError(problem if current == url else f"{url}: redirected to {problem}")
        if secure and not current.lower().startswith("https://"):
            raise FetchError(f"{url}: redirected to {current}, which is not https")
        secure = secure or current.lower().startswith("https://")
        # verify=None: the session's own setting (requests merges it so).
        reply = client.get(
            current, timeout=timeout, stream=True, headers=sent, allow_redirects=False,
            verify=verify,
        )  # fmt: skip
        target = client.get_redirect_target(reply)
        if target is None:
            return reply
        reply.close()
        current = urljoin(current, target)
    raise FetchError(f"{url}: more than {MAX_REDIRECTS} redirects")


def fetch_bytes(
    url: str,
    *,
    max_bytes: int,
    timeout: float,
    session: requests.Session | None = None,
    verify: str | bool | None = None,
    allow_http: bool | None = None,
) -> bytes:
    """GET ``url`` and return its body, refusing bodies larger than ``max_bytes``.

    ``verify`` is requests' (:func:`ca_verify` makes it from a configured ca_path; None keeps
    the session's). ``allow_http`` given: ``url`` is first checked by :func:`url_problem`
    (None: the caller has checked it).

    Raises:
        FetchError: network, HTTP or size failure.
    """
    if allow_http is not None and (problem := url_problem(url, allow_http=allow_http)):
        raise FetchError(problem)
    headers = {"User-Agent": f"lmrunner/{__version__}"}
    import requests

    client = session or requests.Session()
    try:
        # verify=None: the session's own setting, as before verify was a parameter.
        with client.get(url, timeout=timeout, stream=True, headers=headers, verify=verify) as reply:
            reply.raise_for_status()
            if url.startswith("https://") and not reply.url.startswith("https://"):
                # A redirect must not downgrade what was asked for over https.
                raise FetchError(f"{url}: redirected to {reply.url}, which is not https")
            body = bytearray()
            for chunk in reply.iter_content(65536):
                body += chunk
                if len(body) > max_bytes:
                    raise FetchError(f"{url}: larger than {max_bytes} bytes")
            return bytes(body)
    except requests.RequestException as err:
        raise FetchError(f"{url}: {type(err).__name__}: {err}") from err
    finally:
        if session is None:
            client.close()
