"""QMP, QEMU's JSON control protocol, on an LM's two sockets, through QEMU's own library.

``qemu.qmp`` (the QEMU project's maintained client) speaks the protocol: greeting, capabilities
negotiation, command ids, events. It is asyncio-based, and the backend is threaded, so:

- ``events.sock`` is held by one :class:`EventWatch` per LM: an event loop of its own, run by a
  thread of its own until QEMU closes the connection (it exits) or :meth:`EventWatch.close`
  (from any thread, through the loop's thread-safe call);
- ``qmp.sock`` takes short sessions of one command each (:func:`qmp_execute`: one
  ``asyncio.run`` in the calling thread).

Sockets are connected here, through ``/proc/self/fd/<dir>/<name>``, and handed to the library
connected: the socket's own path may then be longer than the 108 bytes a socket address holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient, QMPError, Runstate

from lmrunner.backends.vm.names import QMP_SOCKET
from lmrunner.errors import LmrunnerError

QMP_TIMEOUT = 10.0
#: Longest QMP message read (QEMU's answers and events here are a few hundred bytes): a QEMU
#: taken over by its guest must not make the daemon hold an endless line.
QMP_LINE_LIMIT = 1024 * 1024


class QmpError(LmrunnerError):
    """A QMP session failed (no socket, no greeting, an error answer)."""


def _connect(directory: Path, name: str, timeout: float) -> socket.socket:
    """A stream socket connected to ``directory/name``, whatever the length of its path."""
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(f"/proc/self/fd/{fd}/{name}")
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(fd)
    return sock


async def _open(sock: socket.socket, timeout: float) -> QMPClient:
    """A QMP session on a connected socket (greeting and capabilities done): the socket is the
    session's, or closed."""
    client = QMPClient(readbuflen=QMP_LINE_LIMIT)
    try:
        await asyncio.wait_for(client.connect(sock), timeout)
    except BaseException:
        sock.close()
        raise
    return client


async def _close(client: QMPClient) -> None:
    """Disconnect; the errors that ended the session (QEMU hung up, a bad message) are known."""
    with contextlib.suppress(Exception):
        await client.disconnect()


async def _execute(sock: socket.socket, command: str, timeout: float) -> Any:
    client = await _open(sock, timeout)
    try:
        return await asyncio.wait_for(client.execute(command), timeout)
    finally:
        await _close(client)


def qmp_execute(directory: Path, command: str, timeout: float = QMP_TIMEOUT) -> Any:
    """One command on the LM's command socket (a short session of its own); its ``return``."""
    try:
        sock = _connect(directory, QMP_SOCKET, timeout)
    except OSError as err:
        raise QmpError(f"cannot connect to {directory / QMP_SOCKET}: {err}") from err
    try:
        return asyncio.run(_execute(sock, command, timeout))
    except (QMPError, OSError, EOFError) as err:  # TimeoutError is an OSError
        raise QmpError(f"{command}: {err}") from err


class EventWatch:
    """An LM's event socket, held from a thread of its own: every event QEMU sends is given to
    ``on_event`` (in that thread) until QEMU closes the connection (it exits) or :meth:`close`.

    The session is opened (greeting, ``qmp_capabilities``) in the constructor, which raises
    OSError or :class:`QmpError` when QEMU does not answer; :meth:`start` starts the thread.
    """

    def __init__(
        self,
        directory: Path,
        name: str,
        timeout: float,
        on_event: Callable[[dict[str, Any]], None],
        thread_name: str,
    ) -> None:
        sock = _connect(directory, name, timeout)
        self._loop = asyncio.new_event_loop()
        try:
            self._client = self._loop.run_until_complete(_open(sock, timeout))
        except BaseException as err:
            self._loop.close()
            if isinstance(err, (QMPError, EOFError)):
                raise QmpError(f"{directory / name}: {err}") from err
            raise
        self._stop = self._loop.create_future()
        self._on_event = on_event
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout=timeout)

    def close(self) -> None:
        """End the session, from any thread (the watching thread then ends)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the session ended
            self._loop.call_soon_threadsafe(self._stopped)

    def _stopped(self) -> None:
        if not self._stop.done():
            self._stop.set_result(None)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._watch())
        finally:
            self._loop.close()

    async def _watch(self) -> None:
        listener = self._client.events
        gone = asyncio.ensure_future(self._disconnected())
        try:
            while True:
                get = asyncio.ensure_future(listener.get())
                await asyncio.wait({get, gone, self._stop}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    self._on_event(dict(get.result()))
                    continue
                get.cancel()
                break
            if not self._stop.done():  # QEMU hung up: what it sent before is still queued
                for event in listener.clear():
                    self._on_event(dict(event))
        finally:
            gone.cancel()
            await _close(self._client)

    async def _disconnected(self) -> None:
        while self._client.runstate is Runstate.RUNNING:
            await self._client.runstate_changed()
