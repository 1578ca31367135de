"""Hostile clients: connections that stall, and requests whose method or path no route knows."""

from __future__ import annotations

import socket
import time

import pytest
import requests

from http_worker import REQUEST_SECONDS, SEND_SECONDS
from support import eventually, service

STALLED = 128


def connect(port: int, receive_buffer: int | None = None) -> socket.socket:
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect(("127.0.0.1", port))
    return sock


def half_headers(port: int) -> socket.socket:
    sock = connect(port)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    return sock


def slow_body(port: int) -> socket.socket:
    sock = connect(port)
    sock.sendall(b"POST /coins HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n"
                 b"Content-Length: 1000\r\n\r\nbitcoin ")
    return sock


def never_reading(port: int) -> socket.socket:
    """Asks for 8 MB of answers (200 requests sent at once on one connection) and reads none of them."""
    sock = connect(port, receive_buffer=1024)
    sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 200)
    return sock


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes ``sock`` within ``timeout`` (what it sent meanwhile is read and dropped)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 16):
                return True
    except (TimeoutError, ConnectionResetError):
        return False
    return False


@pytest.mark.parametrize("stall", [half_headers, slow_body, never_reading])
def test_stalled_clients_leave_healthz_answering_and_are_cut_off(fake, stall):
    with service(fake.url) as svc:
        port = int(svc.url.rsplit(":", 1)[1])
        stalled = [stall(port) for _ in range(STALLED)]
        time.sleep(0.5)
        try:
            times = []
            for _ in range(5):
                started = time.monotonic()
                assert requests.get(f"{svc.url}/healthz", timeout=5).status_code == 200
                times.append(time.monotonic() - started)
            assert max(times) < 1.0, times
            if stall is never_reading:
                # The server's FIN waits behind the answers the client never takes: the log says it gave up,
                # SEND_SECONDS after the kernel's buffers for the connection were full (some seconds here).
                eventually(lambda: sum("did not take its answer" in line for line in svc.lines) >= STALLED,
                           SEND_SECONDS + 20, "every never-reading client to be cut off")
            else:
                assert closed_by_server(stalled[0], REQUEST_SECONDS + 3)
                assert all(closed_by_server(sock, 1.0) for sock in stalled[1:])
        finally:
            for sock in stalled:
                sock.close()


def test_a_request_dripped_a_byte_at_a_time_is_cut_off_when_its_time_is_up(fake):
    with service(fake.url) as svc:
        sock = connect(int(svc.url.rsplit(":", 1)[1]))
        sock.settimeout(0.5)
        started = time.monotonic()
        answer = b""
        for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: " + b"x" * 100:
            sock.send(bytes([byte]))
            try:
                answer = sock.recv(4096)
            except TimeoutError:
                continue
            break
        took = time.monotonic() - started
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert answer.endswith(b'{"error": "the request\'s head took over 10 s to arrive: send it in one go"}')
    assert REQUEST_SECONDS <= took < REQUEST_SECONDS + 3


def test_junk_methods_and_paths_leave_the_metrics_a_closed_set_of_series(make_app):
    web = make_app().test_client()
    for i in range(3000):
        web.open(f"/no/such/path/{i}", method=f"JUNK{i}")
        web.open(f"/coins/{i}", method=f"X{i}")

    metrics = web.get("/metrics").text
    series = [line for line in metrics.splitlines() if line.startswith("coin_retriever_http_requests_total{")]
    assert series == ['coin_retriever_http_requests_total{method="other",route="unmatched",status="404"} 3000.0',
                      'coin_retriever_http_requests_total{method="other",route="unmatched",status="405"} 3000.0']
