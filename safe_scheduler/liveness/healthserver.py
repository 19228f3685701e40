"""A liveness endpoint that costs nothing and that no client can stall.

The chart probes every component with ``airflow jobs check``: a whole Python and Airflow start
(2.5–2.7 CPU-seconds, 139 MB here: ``bench/results/probes/``) every minute, only to read the
heartbeat row. It fails when the database is merely slow (#19001, #20644), and a component that
heartbeats without working passes it (#65286). Airflow's own scheduler health server queries the
database on every request too (#39088), and answers one client at a time with no timeout at all:
one idle connection stalls it.

This endpoint is one thread in the job process. It reads two things the process already knows: the
seconds since the last successful heartbeat (recorded by the main thread after the heartbeat was
committed, the same clock the stall watchdog acts on) and whether shutdown has begun. No query, no
process, no interpreter. A process wedged with the GIL held cannot answer at all, and the probe's
timeout counts that as a failure too.

Whoever can reach the port must not be able to make the probe fail (in a cluster: any pod, a port
scanner, a misconfigured scraper). So the thread serves every connection at once from one
``selectors`` loop, never blocks on a client, and bounds what it accepts:

* at most ``MAX_CONNECTIONS`` open connections; a new one beyond that closes the oldest (the probe
  is new, an idle or trickling client old);
* at most ``MAX_REQUEST`` bytes of request line and headers (431 past that);
* at most ``REQUEST_TIMEOUT`` seconds from accept to a whole request (closed past that);
* one request per connection, answered and closed (``Connection: close``);
* at most one wake-up every ``WAKE_EVERY`` seconds, serving whatever is pending at once: each
  wake-up takes the GIL from the job's main thread, and a flood must not make it hand the GIL over
  on every request.

Malformed requests (garbage, an HTTP/0.9 line, a method other than GET or HEAD) get a 4xx and are
closed; nothing is logged for them (stderr can be a full pipe) and nothing is raised. The answer
says only healthy or not and the heartbeat's age: no version, no host, no configuration.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable

from safe_scheduler.base import threads

log = logging.getLogger("safe_scheduler.liveness.healthserver")

PATH = "/health"
#: Connections served at once. A probe is one; 64 leaves room for a scraper, a person and a
#: load balancer, and costs 64 descriptors at most.
MAX_CONNECTIONS = 64
#: Bytes of request line and headers a client may send (a probe sends about 100).
MAX_REQUEST = 4096
#: Seconds from accept to a whole request: a probe sends it at once, a slow client loses its slot.
REQUEST_TIMEOUT = 2.0
#: Connections taken from the listen queue per wake-up, so that a flood cannot starve the others.
ACCEPT_BATCH = 64
#: Seconds between two wake-ups at the least. Each wake-up takes the GIL from the job's main
#: thread; a flood would otherwise make it hand the GIL over on every request. Batched, a flood
#: costs at most 1 / WAKE_EVERY hand-overs a second, and a probe waits at most this long.
WAKE_EVERY = 0.02
#: The kernel's queue of connections not yet accepted. While this thread waits for the GIL or a
#: core, a burst of connections must not overflow it: the kernel would drop the probe's handshake,
#: and the client would only try again after a second.
BACKLOG = 1024
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


class Health:
    """Healthy while heartbeats are recent and shutdown has not begun; the age says how recent."""

    def __init__(self, seconds_since_heartbeat: Callable[[], float], shutting_down: Callable[[], bool],
                 unhealthy_after: float, notes: list[Callable[[], dict]] | None = None) -> None:
        self.seconds_since_heartbeat = seconds_since_heartbeat
        self.shutting_down = shutting_down
        self.unhealthy_after = unhealthy_after
        #: More for the body, never for the verdict (the api-server's word on the database): each
        #: must answer from memory, as the rest of the body does.
        self.notes = [] if notes is None else notes

    def answer(self) -> tuple[bool, dict]:
        age = self.seconds_since_heartbeat()
        healthy = not self.shutting_down() and age < self.unhealthy_after
        body = {"status": "healthy" if healthy else "unhealthy", "seconds_since_heartbeat": round(age, 1)}
        for note in list(self.notes):
            body.update(note())
        return healthy, body


class Waiting:
    """Alive, and waiting for the metadata database or the broker (``dbwait``): a probe passes,
    because a restarted container would only wait again, later."""

    def __init__(self, since: float, what: str = "the metadata database") -> None:
        self.since = since
        self.what = what

    def answer(self) -> tuple[bool, dict]:
        return True, {"status": f"waiting for {self.what}",
                      "seconds_waiting": round(time.monotonic() - self.since, 1)}


def request_line(head: bytes) -> tuple[str, str] | None:
    """(method, target) of an HTTP/1.x request line; None for anything else (garbage, HTTP/0.9)."""
    try:
        method, target, version = head.split(b"\n", 1)[0].decode("ascii").strip().split(" ")
    except (UnicodeDecodeError, ValueError):
        return None
    return (method, target) if version in ("HTTP/1.0", "HTTP/1.1") else None


def response(health: Health | Waiting, head: bytes) -> bytes:
    """The whole response to a request whose line and headers are ``head``."""
    line = request_line(head)
    if line is None:
        return _message(400)
    method, target = line
    if method not in ("GET", "HEAD"):
        return _message(405, extra=b"Allow: GET, HEAD\r\n")
    if target.split("?", 1)[0] != PATH:
        return _message(404)
    healthy, fields = health.answer()
    body = json.dumps(fields).encode()
    return _message(200 if healthy else 503, body, b"Content-Type: application/json\r\n", head_only=method == "HEAD")


def _message(status: int, body: bytes = b"", extra: bytes = b"", head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n").encode() + extra + b"\r\n"
    return head if head_only else head + body


class _Client:
    """One connection: what it has sent so far, what is left to send it, and until when it may take."""

    __slots__ = ("sock", "received", "outgoing", "deadline")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.received = b""
        self.outgoing = b""
        self.deadline = deadline


class HealthServer:
    """The listening socket and its clients, served by one thread from one ``selectors`` loop."""

    def __init__(self, host: str, port: int, health: Health | Waiting) -> None:
        self.health = health
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        # A restart right after a crash must not find the port in TIME_WAIT.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
            self.socket.listen(BACKLOG)
        except OSError:
            self.socket.close()
            raise
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.socket, selectors.EVENT_READ)
        #: ``close`` writes here: the loop may be blocked in ``select``, which a close elsewhere won't wake.
        self._wake, self._waker = socket.socketpair()
        self._selector.register(self._wake, selectors.EVENT_READ)
        self._thread: threading.Thread | None = None
        #: Open connections, oldest first (dicts keep insertion order): the oldest goes when full.
        self._clients: dict[socket.socket, _Client] = {}
        # A forked child (executor worker, serve-logs) would keep the listening socket, and with it
        # the port, after this process is gone (as serve-logs' leftovers do, #40726).
        os.register_at_fork(after_in_child=self._close_all)

    def _close_all(self) -> None:
        for sock in [self.socket, self._wake, self._waker, *self._clients]:
            try:
                sock.close()
            except OSError:
                pass
        try:
            self._selector.close()
        except (OSError, ValueError):
            pass

    def start(self) -> None:
        self._thread = threads.start_daemon("safe-health", self._serve)

    def close(self, seconds: float = 1.0) -> None:
        """Stop serving and free the port (within ``seconds``: the loop closes what it holds)."""
        try:
            self._waker.send(b"x")
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(seconds)
        self._close_all()  # whatever the loop had not closed yet (closing twice is harmless)

    def _serve(self) -> None:
        while True:
            began = time.monotonic()
            try:
                if not self.serve_once():
                    break
            except (OSError, ValueError):  # the selector or the socket was closed: on the way out
                return
            time.sleep(max(0.0, began + WAKE_EVERY - time.monotonic()))
        self._close_all()

    def serve_once(self) -> bool:
        """Wait for something to do (no longer than the nearest client deadline), and do it; False
        once ``close`` asked the loop to end."""
        now = time.monotonic()
        wait = min((c.deadline for c in self._clients.values()), default=now + 3600) - now
        for key, events in self._selector.select(max(0.0, wait)):
            if key.fileobj is self._wake:
                return False
            if key.fileobj is self.socket:
                self._accept()
            else:
                client = self._clients.get(key.fileobj)  # type: ignore[arg-type]
                if client is not None:
                    self._step(client, events)
        now = time.monotonic()
        for client in [c for c in self._clients.values() if c.deadline <= now]:
            self._close(client)
        return True

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the client gave up before we took it (ECONNABORTED), or no fds left
                return
            if len(self._clients) >= MAX_CONNECTIONS:
                self._close(next(iter(self._clients.values())))
            sock.setblocking(False)
            client = _Client(sock, time.monotonic() + REQUEST_TIMEOUT)
            self._clients[sock] = client
            self._selector.register(sock, selectors.EVENT_READ)

    def _step(self, client: _Client, events: int) -> None:
        if events & selectors.EVENT_READ and not client.outgoing:
            try:
                data = client.sock.recv(MAX_REQUEST + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # closed mid-request
                self._close(client)
                return
            client.received += data
            end = client.received.find(b"\r\n\r\n")
            if end < 0:
                end = client.received.find(b"\n\n")
            if end < 0 and b"\n" in client.received and request_line(client.received) is None:
                self._reply(client, _message(400))  # no need to wait for headers that cannot help
            elif end < 0 and len(client.received) > MAX_REQUEST:
                self._reply(client, _message(431))
            elif end >= 0:
                self._reply(client, response(self.health, client.received[:end]) if end <= MAX_REQUEST
                            else _message(431))
        elif events & selectors.EVENT_WRITE:
            self._send(client)

    def _reply(self, client: _Client, data: bytes) -> None:
        client.outgoing = data
        self._send(client)
        if client.outgoing and client.sock in self._clients:
            self._selector.modify(client.sock, selectors.EVENT_WRITE)

    def _send(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.outgoing)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(client)
            return
        client.outgoing = client.outgoing[sent:]
        if not client.outgoing:
            self._close(client)

    def _close(self, client: _Client) -> None:
        self._clients.pop(client.sock, None)
        try:
            self._selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()


def start(host: str, port: int, health: Health | Waiting) -> HealthServer:
    """Bind and serve; ``OSError`` (port taken, bad address) is the caller's to report."""
    server = HealthServer(host, port, health)
    server.start()
    log.info("Liveness endpoint on http://%s:%d%s", host or "0.0.0.0", server.server_address[1], PATH)
    return server
