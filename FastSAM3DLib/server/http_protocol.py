"""uvicorn's h11 HTTP protocol with a deadline for each request head: a connection that sends no request, or sends
its request line and headers too slowly, is closed instead of holding a file descriptor for ever."""
from __future__ import annotations

from typing import Optional

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

# From the connection (after the TLS handshake) or the first byte of a keep-alive request to the end of its headers.
REQUEST_HEAD_TIMEOUT_S = 30.0


class HeadDeadlineProtocol(H11Protocol):
    """:class:`H11Protocol` that closes a connection whose request head is not complete ``REQUEST_HEAD_TIMEOUT_S``
    after it began. uvicorn times out only the wait between keep-alive requests, and not at all once a byte of
    the next request has arrived, so a client that connected and sent nothing kept its connection open."""

    _head_deadline: Optional[object] = None

    def connection_made(self, transport) -> None:  # noqa: D102 (asyncio's)
        super().connection_made(transport)
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:  # noqa: D102 (asyncio's)
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self._head_deadline is None:  # the first bytes of a keep-alive request
                self._arm_head_deadline()
        else:
            self._disarm_head_deadline()

    def connection_lost(self, exc) -> None:  # noqa: D102 (asyncio's)
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(REQUEST_HEAD_TIMEOUT_S, self._head_too_late)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_late(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
