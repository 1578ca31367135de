"""gunicorn's threaded worker, guarded against clients that stall, and answering its own errors in JSON.

gunicorn's ``gthread`` worker hands a connection to a thread as soon as it has bytes to read;
the thread then blocks until the whole request has come. Sixty-four clients that send half a
request line's headers and stop would hold sixty-four threads for as long as they like. This
worker reads each request in its main loop instead, without blocking, as an event-driven server
does: a thread is given the connection only once its head and its body (when it has a length,
up to the body limit, or the last chunk of a chunked one) are all here. A request that has not
all come within ``REQUEST_SECONDS`` is cut off there, however slowly its bytes drip.

A client that never reads its answer holds the thread writing it; each write of a piece of an
answer gives up after ``SEND_SECONDS`` (``BoundedSocket``), the thread closes the connection
itself (gunicorn would linger on it in its main loop), and the pool has more threads than the 128
stalled clients the contract names, so ``/healthz`` always finds a free one.
"""

from __future__ import annotations

import errno
import json
import logging
import re
import selectors
import socket
import time
from contextlib import suppress
from functools import partial

from gunicorn import util
from gunicorn.workers.gthread import TConn, ThreadWorker

REQUEST_SECONDS = 10.0
# A request cut off is answered 408, then what the client still sends is read and dropped this long,
# so that closing the socket does not reset the connection before the client has read the answer.
CLOSE_LINGER_SECONDS = 2.0
SEND_SECONDS = 10.0
# More than a head gunicorn accepts (a 4 KB request line, 100 fields of 8 KB): gunicorn then refuses it.
MAX_HEAD_BYTES = 1 << 20
READ_BYTES = 1 << 16
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length[ \t]*:[ \t]*(\d{1,12})[ \t]*(?=\r\n)")
CHUNKED = re.compile(rb"\r\ntransfer-encoding[ \t]*:[^\r\n]*chunked")
EXPECT_CONTINUE = re.compile(rb"\r\nexpect[ \t]*:[ \t]*100-continue[ \t]*(?=\r\n)", re.IGNORECASE)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

log = logging.getLogger(__name__)


def write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's own refusals (400, 414, 431 …) as ``{"error": ...}``, like the application's.

    gunicorn offers no hook for the body of its own errors; its worker writes them through
    ``gunicorn.util.write_error``, which this worker process replaces."""
    body = json.dumps({"error": f"{reason}: {mesg}" if mesg else reason}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin-1")
    util.write_nonblock(sock, head + body)


class Arrival:
    """A request arriving on a connection: its bytes so far, and when it must have come whole."""

    def __init__(self, conn: TConn, deadline: float, max_body: int) -> None:
        self.conn = conn
        self.deadline = deadline
        self.max_body = max_body
        self.data = bytearray()
        self.closing = False

    def complete(self) -> bool:
        """Whether the request is here: its head, and its body when it has a length (or is chunked)."""
        head_end = self.data.find(b"\r\n\r\n")
        if head_end < 0:
            return len(self.data) > MAX_HEAD_BYTES
        head = bytes(self.data[: head_end + 2]).lower()
        if CHUNKED.search(head):
            return self.data.endswith(b"0\r\n\r\n") or len(self.data) > self.max_body + head_end
        length = CONTENT_LENGTH.search(head)
        if length is None:
            return True
        wanted = int(length.group(1))
        return wanted > self.max_body or len(self.data) >= head_end + 4 + wanted

    def refuse_late(self) -> None:
        """Tell a client whose request did not come whole in time why it is cut off (a JSON 408)."""
        what = "body" if b"\r\n\r\n" in self.data else "request's head"
        body = json.dumps({"error": f"the {what} took over {REQUEST_SECONDS:g} s to arrive: send it in one go"})
        head = (f"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        with suppress(OSError):
            self.conn.sock.send((head + body).encode())
            self.conn.sock.shutdown(socket.SHUT_WR)
        self.closing = True
        self.deadline = time.monotonic() + CLOSE_LINGER_SECONDS

    def answer_expect_continue(self) -> None:
        """A client that waits for ``100 Continue`` before its body gets it here, and the head loses its
        ``Expect`` (the thread that serves it must not send a second one)."""
        head_end = self.data.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = bytes(self.data[: head_end + 2])
        trimmed = EXPECT_CONTINUE.sub(b"", head)
        if trimmed != head:
            self.data[: head_end + 2] = trimmed
            with suppress(OSError):
                self.conn.sock.send(CONTINUE)


class GuardedWorker(ThreadWorker):
    """The threaded worker, with requests read whole in the main loop and every answer it makes JSON."""

    # The service refuses a larger body (413): past it, a request goes to a thread to be refused.
    max_body = 5 * 1024 * 1024

    def init_process(self) -> None:
        util.write_error = write_json_error
        self.arrivals: dict[TConn, Arrival] = {}
        self.log.error_log.addFilter(_quiet_cut_off)
        super().init_process()

    def accept(self, listener) -> None:
        try:
            client_sock, client_addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self._await_request(TConn(self.cfg, client_sock, client_addr, listener.getsockname()))

    def on_client_socket_readable(self, conn, client) -> None:
        """A kept-alive connection's next request: read in the main loop too."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._await_request(conn)

    def _await_request(self, conn: TConn) -> None:
        conn.sock.setblocking(False)
        arrival = Arrival(conn, time.monotonic() + REQUEST_SECONDS, self.max_body)
        self.arrivals[conn] = arrival
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, arrival))

    def _on_readable(self, arrival: Arrival, sock) -> None:
        try:
            chunk = sock.recv(READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(arrival)
            return
        if arrival.closing:
            return
        arrival.data += chunk
        arrival.answer_expect_continue()
        if arrival.complete():
            self.poller.unregister(sock)
            del self.arrivals[arrival.conn]
            arrival.conn.arrived = bytes(arrival.data)
            arrival.conn.data_ready = True
            self.enqueue_req(arrival.conn)

    def murder_pending(self) -> None:
        """gunicorn's sweep of waiting connections, and of requests that did not come whole in time."""
        super().murder_pending()
        now = time.monotonic()
        for arrival in [arrival for arrival in self.arrivals.values() if arrival.deadline <= now]:
            if arrival.data and not arrival.closing:
                arrival.refuse_late()
            else:
                self._drop(arrival)

    def _drop(self, arrival: Arrival) -> None:
        self.arrivals.pop(arrival.conn, None)
        with suppress(KeyError, ValueError, OSError):
            self.poller.unregister(arrival.conn.sock)
        self.nr_conns -= 1
        arrival.conn.close()

    def handle(self, conn: TConn):
        """Serve the request that arrived whole: its bytes go to the parser first, then the socket."""
        arrived = getattr(conn, "arrived", None)
        if arrived is not None:
            conn.arrived = None
            conn.sock.setblocking(True)
            conn.init()
            conn.parser.unreader.unread(arrived)
        conn.sock.__class__ = BoundedSocket
        keep = super().handle(conn)
        if keep is False:
            conn.close(graceful=True)
            conn.closed_in_thread = True
        return keep

    def finish_request(self, conn: TConn, fs) -> None:
        """gunicorn closes a finished connection gracefully in its main loop, lingering up to 2 s on each:
        a hundred clients cut off at once would stop it accepting for minutes. Here the thread that
        served the connection has closed it already."""
        if getattr(conn, "closed_in_thread", False):
            self.nr_conns -= 1
            return
        super().finish_request(conn, fs)


class BoundedSocket(socket.socket):
    """A connection's socket whose "blocking" mode has a limit: gunicorn's threads switch a socket to
    blocking before they read a request and write its answer; here each read, and each write of a piece
    of the answer (``sendall``), then fails after ``SEND_SECONDS``, progress or not."""

    __slots__ = ()

    def setblocking(self, flag: bool) -> None:
        if flag:
            self.settimeout(SEND_SECONDS)
        else:
            super().setblocking(False)


def _quiet_cut_off(record: logging.LogRecord) -> bool:
    """gunicorn logs a connection it had to give up on with a traceback; a client cut off for not reading
    (or not sending) within the bounds is one INFO line instead."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, TimeoutError):
        record.msg, record.args = "a client did not take its answer within %.0fs: connection closed", (SEND_SECONDS,)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
    return True
