"""Size- and time-limited HTTP GETs (Vacuum Pipes, remote user_data templates)."""

from __future__ import annotations

import requests

from lmrunner import __version__
from lmrunner.errors import LmrunnerError


class FetchError(LmrunnerError):
    """A URL could not be fetched; the message says which and why, in one line."""


def fetch_bytes(
    url: str, *, max_bytes: int, timeout: float, session: requests.Session | None = None
) -> bytes:
    """GET ``url`` and return its body, refusing bodies larger than ``max_bytes``.

    Raises:
        FetchError: network, HTTP or size failure.
    """
    headers = {"User-Agent": f"lmrunner/{__version__}"}
    client = session or requests.Session()
    try:
        with client.get(url, timeout=timeout, stream=True, headers=headers) as reply:
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
