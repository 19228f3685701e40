"""A liveness endpoint that costs nothing: answered from the watchdogs' own state.

The chart probes every component with ``airflow jobs check``: a whole Python and Airflow start
(2.5–2.7 CPU-seconds, 139 MB here: ``bench/results/probes/``) every minute, only to read the
heartbeat row. It fails when the
database is merely slow (#19001, #20644), and a component that heartbeats without working passes
it (#65286). Airflow's own scheduler health server queries the database on every request too
(#39088).

This endpoint is a thread in the job process. It reads two things the process already knows: the
seconds since the last successful heartbeat (recorded by the main thread after the heartbeat was
committed, the same clock the stall watchdog acts on) and whether shutdown has begun. No query, no
process, no interpreter. A process wedged with the GIL held cannot answer at all, and the probe's
timeout counts that as a failure too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer

from safe_scheduler import threads

log = logging.getLogger("safe_scheduler.healthserver")

PATH = "/health"
#: Seconds a client gets to send its request: one slow client must not hold the probe of the next.
REQUEST_TIMEOUT = 5.0


class Health:
    """Healthy while heartbeats are recent and shutdown has not begun; the age says how recent."""

    def __init__(self, seconds_since_heartbeat: Callable[[], float], shutting_down: Callable[[], bool],
                 unhealthy_after: float) -> None:
        self.seconds_since_heartbeat = seconds_since_heartbeat
        self.shutting_down = shutting_down
        self.unhealthy_after = unhealthy_after

    def read(self) -> tuple[bool, float]:
        age = self.seconds_since_heartbeat()
        return (not self.shutting_down() and age < self.unhealthy_after), age


class _Handler(BaseHTTPRequestHandler):
    # Nothing about the software or its version: the answer is healthy or not, and the age.
    server_version = "health"
    sys_version = ""
    timeout = REQUEST_TIMEOUT
    error_message_format = ""
    health: Health

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        if self.path.split("?", 1)[0] != PATH:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        healthy, age = self.health.read()
        payload = json.dumps({
            "status": "healthy" if healthy else "unhealthy",
            "seconds_since_heartbeat": round(age, 1),
        }).encode()
        self.send_response(200 if healthy else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # a probe every few seconds is not news; stderr can be a full pipe


class HealthServer(HTTPServer):
    allow_reuse_address = True  # a restart right after a crash must not find the port in TIME_WAIT

    def __init__(self, host: str, port: int, health: Health) -> None:
        handler = type("HealthHandler", (_Handler,), {"health": health})
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.address_family = family
        super().__init__((host, port), handler)
        # A forked child (executor worker, serve-logs) would keep the listening socket, and with it
        # the port, after this process is gone (as serve-logs' leftovers do, #40726).
        os.register_at_fork(after_in_child=self._close_in_child)

    def _close_in_child(self) -> None:
        try:
            self.socket.close()
        except OSError:
            pass

    def start(self) -> None:
        """Answer from a daemon thread, blocked in ``accept`` between requests (no polling)."""
        threads.start_daemon("safe-health", self._serve)

    def _serve(self) -> None:
        # ``timeout`` is None: ``handle_request`` blocks until a client comes. A failing request
        # goes to ``handle_error``; only a closed socket ends the loop.
        while True:
            try:
                self.handle_request()
            except (OSError, ValueError):  # the socket was closed: the process is on its way out
                return

    def handle_error(self, request: object, client_address: object) -> None:
        log.debug("health request from %s failed", client_address, exc_info=True)


def start(host: str, port: int, health: Health) -> HealthServer:
    """Bind and serve; ``OSError`` (port taken, bad address) is the caller's to report."""
    server = HealthServer(host, port, health)
    server.start()
    log.info("Liveness endpoint on http://%s:%d%s", host or "0.0.0.0", server.server_address[1], PATH)
    return server

