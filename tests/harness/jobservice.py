"""A stand-in for an external job service (a cloud job API) on loopback, for task tests.

POST /jobs starts a job, GET /jobs/N reads its state, POST /jobs/N/cancel cancels it; every call
is recorded, so a test can count starts and cancels from outside the task. POST /jobs?slow=S records
the call at once and answers S seconds later: a start still waiting for its job's id.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JobService:
    """The stand-in external service: POST /jobs starts, POST /jobs/N/cancel cancels."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        #: When each call came (``time.monotonic`` of this process), beside ``calls``.
        self.times: list[float] = []
        self.jobs: dict[int, str] = {}
        service = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                path, _, query = self.path.partition("?")
                parts = path.strip("/").split("/")
                service.times.append(time.monotonic())
                service.calls.append(self.path)
                if parts == ["jobs"]:
                    time.sleep(float(query.removeprefix("slow=") or 0))
                    job = len(service.jobs) + 1
                    service.jobs[job] = "running"
                    self._reply({"id": job})
                elif parts[0] == "jobs" and parts[-1] == "cancel":
                    service.jobs[int(parts[1])] = "cancelled"
                    self._reply({})
                else:
                    self._reply({})

            def do_GET(self) -> None:
                parts = self.path.strip("/").split("/")
                self._reply({"state": service.jobs.get(int(parts[1]), "unknown")})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def when(self, suffix: str) -> list[float]:
        """When each call whose path ends with ``suffix`` came."""
        return [at for at, call in zip(list(self.times), list(self.calls)) if call.endswith(suffix)]

    def task_pids(self) -> list[int]:
        """The pid of each task process that ran ``run_job`` (it says so first)."""
        return [int(call.split("/")[2]) for call in list(self.calls) if call.startswith("/pids/")]

    def count(self, prefix: str) -> int:
        return sum(1 for call in list(self.calls) if call.startswith(prefix))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
