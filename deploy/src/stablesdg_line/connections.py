"""Connections bounded in time and in number (issue 24): uvicorn's h11 protocol with a header timeout, a body
timeout and a connection cap fitted to the process's descriptor limit. Needs the `serve` extra.

uvicorn closes a connection that is idle *between* requests (`--keep-alive-timeout`), but one that sends its
request head or its body a byte at a time stayed open for ever, and every open connection holds a
descriptor: under the usual 1024-descriptor limit, 1100 idle connections stopped `/health` from answering
(accept() failed with EMFILE). Here:
- the request head must be complete within `header_timeout_s` of the connection opening (or of the previous
  response), and the body within `body_timeout_s` of its head; otherwise the answer is 408 and the
  connection is closed;
- at most `max_connections` connections are open. One more closes the connection that has waited longest
  without a request in progress (idle keep-alive, or a head still arriving); when every connection has a
  request in progress, the new one is answered 503 and closed at once. A request in progress is never cut.
"""

from __future__ import annotations

import json
import logging
import resource
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("stablesdg_line")

DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0
# asyncio accepts up to `backlog` sockets per loop turn before any of them is looked at: keep that batch
# inside the descriptors reserved beyond the cap, so the cap is enforced before the limit is reached.
ACCEPT_BACKLOG = 64
# Descriptors kept for everything that is not a client connection: the accept batch, spooled uploads
# (at most --max-spool-mb of them, 1 MB and more each), the model, logs, libraries, the review folder.
FD_RESERVE = 192


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_connections: int = 512


def fit_connection_cap(requested: int) -> tuple[int, str]:
    """min(requested, RLIMIT_NOFILE - FD_RESERVE), after raising the soft limit towards the hard one if the
    request needs it; returns the cap and a sentence saying how it was chosen (logged at start-up)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = requested + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < wanted and (hard == resource.RLIM_INFINITY or hard > soft):
        new_soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return requested, f"at most {requested} open connections (--limit-concurrency; no RLIMIT_NOFILE)"
    room = max(soft - FD_RESERVE, soft // 4, 1)
    cap = min(requested, room)
    why = ("--limit-concurrency" if cap == requested
           else f"RLIMIT_NOFILE {soft} less {FD_RESERVE} descriptors kept for files; raise LimitNOFILE "
                "for more")
    return cap, (f"at most {cap} open connections ({why}; --limit-concurrency {requested}, "
                 f"RLIMIT_NOFILE {soft})")


def _raw_response(status: int, reason: str, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\n"
            f"content-length: {len(body)}\r\n\r\n").encode() + body


class BoundedH11Protocol(H11Protocol):
    """uvicorn's H11Protocol plus the time and number bounds above; `protocol_class` sets the limits."""

    limits = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: Any = None  # asyncio.TimerHandle of the phase being waited for
        self._phase: str | None = None  # "head" or "body": what the connection is waiting for
        self._waiting_since = 0.0

    # ------------------------------------------------------------------ asyncio.Protocol / H11Protocol hooks
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._waiting_since = self.loop.time()
        self._arm("head")
        if len(self.connections) > self.limits.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    # ------------------------------------------------------------------ time
    def _track(self) -> None:
        """Arm the timer of what the connection waits for now (head, body) or disarm it (the app works)."""
        if self.transport.is_closing():
            self._disarm()
            return
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body")
        elif state is h11.IDLE and self._request_done():
            if self._phase != "head":
                self._waiting_since = self.loop.time()
                self._arm("head")
        else:
            self._disarm()

    def _arm(self, phase: str) -> None:
        self._disarm()
        seconds = self.limits.header_timeout_s if phase == "head" else self.limits.body_timeout_s
        self._phase = phase
        self._timer = self.loop.call_later(seconds, self._timed_out, phase, seconds)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._phase = None, None

    def _timed_out(self, phase: str, seconds: float) -> None:
        self._timer, self._phase = None, None
        if self.transport.is_closing():
            return
        what = "request head" if phase == "head" else "request body"
        started = self.cycle is not None and not self.cycle.response_complete and self.cycle.response_started
        if phase == "body" or self.conn.trailing_data[0]:  # an idle keep-alive is closed without a word
            log.warning("closing a connection from %s: %s not received within %g s", self._peer(), what,
                        seconds)
            if not started:
                self.transport.write(_raw_response(408, "Request Timeout",
                                                   f"{what} not received within {seconds:g} s"))
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's receive() gets http.disconnect, its send is dropped
            self.cycle.message_event.set()
        self.transport.close()

    # ------------------------------------------------------------------ number
    def _request_done(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _make_room(self) -> None:
        idle = [c for c in self.connections
                if isinstance(c, BoundedH11Protocol) and c is not self and c._request_done()
                and not c.transport.is_closing()]
        if idle:
            min(idle, key=lambda c: c._waiting_since).transport.close()
            return
        log.warning("refusing a connection from %s: %d connections open, each with a request in progress",
                    self._peer(), len(self.connections) - 1)
        self.transport.write(_raw_response(503, "Service Unavailable",
                                           f"{self.limits.max_connections} connections open, each with a "
                                           "request in progress; retry later"))
        self.transport.close()

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "?"


def protocol_class(limits: ConnectionLimits) -> type[BoundedH11Protocol]:
    """The protocol uvicorn builds per connection (`uvicorn.run(..., http=protocol_class(limits))`)."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,), {"limits": limits})
