"""Our liveness endpoint, against real components and a real PostgreSQL server.

It must answer from memory (a frozen database does not slow it down), turn unhealthy once
heartbeats stop or shutdown begins, and be gone with the process. Every status here is read over
HTTP from outside, as the kubelet reads it.
"""

from __future__ import annotations

import json
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest

from procs import wait_for
from test_components import started
from test_faults import HANGING_SHUTDOWN_PLUGIN, MARGIN, assert_exits, assert_no_orphans



def probe(port: int, path: str = "/health", method: str = "GET") -> tuple[int | None, dict, dict]:
    """(status, JSON body, headers) of one request; status None if nothing answers."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=2) as resp:
            status, body, headers = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        status, body, headers = exc.code, exc.read(), dict(exc.headers)
    except OSError:
        return None, {}, {}
    return status, (json.loads(body) if body else {}), headers


def healthy(proc, port: int):
    def condition() -> bool:
        if proc.popen.poll() is not None:
            raise AssertionError(f"exited early with {proc.popen.returncode}:\n{proc.log()[-4000:]}")
        return probe(port)[0] == 200

    return condition


@pytest.mark.parametrize("name", [
    pytest.param("scheduler", marks=pytest.mark.all_versions),
    pytest.param("triggerer", marks=pytest.mark.all_versions),
    "dag-processor",
])
def test_healthy_from_memory_then_unhealthy_when_heartbeats_stop(deployment, postgres, name):
    port = deployment.endpoint_port(name)
    proc = started(deployment, postgres, name, "--stall-timeout", "10", "--shutdown-timeout", "8")
    wait_for(healthy(proc, port), 60, interval=0.3, message="the endpoint to say healthy")
    status, body, _ = probe(port)
    assert body["status"] == "healthy" and 0 <= body["seconds_since_heartbeat"] < 10, body

    postgres.freeze()
    frozen = time.monotonic()
    # No query behind the answer: with every DB process stopped it comes at once, and still healthy
    # (the last heartbeat is younger than the stall timeout).
    status, body, _ = probe(port)
    assert status == 200 and time.monotonic() - frozen < 1.0, (status, body)

    seen: list[int | None] = []

    def unhealthy() -> bool:
        seen.append(probe(port)[0])
        return seen[-1] != 200

    wait_for(unhealthy, 10 + MARGIN, interval=0.2, message="the endpoint to turn unhealthy")
    assert seen[-1] == 503, seen[-5:]  # unhealthy, not gone: the process is still shutting down
    assert time.monotonic() - frozen < 10 + 2, f"unhealthy only after {time.monotonic() - frozen:.1f}s"
    code, _ = assert_exits(proc, frozen, 10 + 8 + MARGIN)
    postgres.thaw()
    assert code == 4, proc.log()[-4000:]
    assert probe(port)[0] is None  # gone with the process
    assert_no_orphans(proc)


def test_unhealthy_while_shutting_down_and_nothing_else_answered(deployment, postgres):
    """SIGTERM with a listener that hangs the stop: a fresh heartbeat, but shutting down is 503."""
    deployment.add_plugin("blocker", HANGING_SHUTDOWN_PLUGIN)
    port = deployment.endpoint_port("scheduler")
    proc = started(deployment, postgres, "scheduler", "--shutdown-timeout", "10", "--child-stop-timeout", "2")
    wait_for(healthy(proc, port), 60, interval=0.3, message="the endpoint to say healthy")

    status, body, headers = probe(port, method="HEAD")
    assert status == 200 and body == {}
    assert "Python" not in headers.get("Server", "") and "BaseHTTP" not in headers.get("Server", "")
    for path in ("/", "/health/", "/metrics", "/api/v1/health"):
        assert probe(port, path)[0] == 404, path
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:  # not HTTP at all
        sock.sendall(b"\x16\x03\x01garbage\r\n\r\n")
        sock.recv(1024)
    assert probe(port)[0] == 200  # a bad client does not end the endpoint

    sent = proc.signal(signal.SIGTERM)
    wait_for(lambda: probe(port)[0] == 503, 5, interval=0.1, message="503 once shutdown began")
    status, body, _ = probe(port)
    assert body == {"status": "unhealthy", "seconds_since_heartbeat": body["seconds_since_heartbeat"]}
    assert body["seconds_since_heartbeat"] < 10, body
    code, _ = assert_exits(proc, sent, 10 + MARGIN)
    assert code == 3, proc.log()[-4000:]
    assert_no_orphans(proc)


def test_can_be_turned_off(deployment):
    proc = deployment.scheduler(AIRFLOW__SAFE_SCHEDULER__ENABLE_HEALTH_CHECK="False")
    proc.wait_healthy()  # Airflow's own health check: the scheduler runs
    assert probe(deployment.endpoint_port("scheduler"))[0] is None
