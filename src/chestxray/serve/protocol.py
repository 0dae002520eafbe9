"""uvicorn's HTTP/1.1 protocol with a limit on how long a request head may take.

uvicorn has a keep-alive timeout but none for a client that connects and sends its
headers a byte at a time, and ASGI middleware only runs once the headers are in; so the
limit lives in the protocol. `chestxray serve` passes `HeaderTimeoutH11Protocol` to
uvicorn as `http=`. The limit is a class attribute set from the settings before the
server starts (and inherited by `--workers` through CHESTXRAY_HEADER_TIMEOUT_S).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_ENV = "CHESTXRAY_HEADER_TIMEOUT_S"


def _default_timeout() -> float:
    try:
        return float(os.environ.get(HEADER_TIMEOUT_ENV, "10"))
    except ValueError:
        return 10.0


class HeaderTimeoutH11Protocol(H11Protocol):
    """Closes a connection with 408 when a request head is not complete within
    `header_timeout_s` of the connection opening or of its first byte after a response."""

    header_timeout_s: float = _default_timeout()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the head is in; the body has its own limit (uploads.py)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.our_state is h11.IDLE:
            body = b"request headers not received in time\n"
            try:
                out = self.conn.send(
                    h11.Response(
                        status_code=408,
                        headers=[
                            (b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                        ],
                        reason=b"Request Timeout",
                    )
                )
                out = (out or b"") + (self.conn.send(h11.Data(data=body)) or b"")
                out += self.conn.send(h11.EndOfMessage()) or b""
                self.transport.write(out)
            except h11.LocalProtocolError:
                pass
        self.transport.close()
