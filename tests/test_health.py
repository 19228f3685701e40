"""Our liveness endpoint, against real components and a real PostgreSQL server.

It must answer from memory (a frozen database does not slow it down), turn unhealthy once
heartbeats stop or shutdown begins, and be gone with the process. Every status here is read over
HTTP from outside, as the kubelet reads it.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from harness.components import started_component
from harness.faults import HANGING_SHUTDOWN_PLUGIN, MARGIN, assert_exits, assert_no_orphans
from harness.procs import threads_of, wait_for


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
    proc = started_component(deployment, postgres, name, "--stall-timeout", "10", "--shutdown-timeout", "8")
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
    proc = started_component(deployment, postgres, "scheduler", "--shutdown-timeout", "10", "--child-stop-timeout", "2")
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


def _trickle(port: int, stop: threading.Event) -> None:
    """A client that sends its request one byte a second, reconnecting whenever it is cut off."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                for byte in request:
                    if stop.wait(1.0):
                        return
                    sock.sendall(bytes([byte]))
        except OSError:
            continue


def _answer(port: int, data: bytes, close_early: bool = False) -> bytes:
    """The status line the endpoint answers ``data`` with; b"" if it only closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        if close_early:
            return b""
        reply = b""
        while b"\r\n" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.split(b"\r\n", 1)[0]


@pytest.mark.all_versions
def test_no_client_can_stall_the_probe(deployment, postgres):
    """100 idle connections and 10 clients that send a byte a second: the probe still gets 200 in
    under a second, ten times in a row; malformed requests get a 4xx and leave no trace."""
    port = deployment.endpoint_port("scheduler")
    proc = started_component(deployment, postgres, "scheduler")
    wait_for(healthy(proc, port), 60, interval=0.3, message="the endpoint to say healthy")
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(100)]
    stop = threading.Event()
    trickles = [threading.Thread(target=_trickle, args=(port, stop), daemon=True) for _ in range(10)]
    try:
        for thread in trickles:
            thread.start()
        for _ in range(10):
            asked = time.monotonic()
            status, body, _ = probe(port)
            took = time.monotonic() - asked
            assert status == 200 and took < 1.0, (status, body, f"{took:.2f}s")
    finally:
        stop.set()
        for sock in idle:
            sock.close()
        for thread in trickles:
            thread.join(5)

    assert _answer(port, b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.1 4")
    assert _answer(port, b"GET /health\r\n").startswith(b"HTTP/1.1 4")  # HTTP/0.9
    assert _answer(port, b"GET /health HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n").startswith(b"HTTP/1.1 4")
    assert _answer(port, b"DELETE /health HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 4")
    _answer(port, b"GET /hea", close_early=True)  # closed mid-request
    status, _, _ = probe(port)
    assert status == 200
    assert "safe-health" in {name for name, _ in threads_of(proc.job_pid).values()}
    since_start = proc.log().split("Liveness endpoint on", 1)[1].split("\n", 1)[1]
    assert "safe_scheduler.liveness.healthserver" not in since_start and "safe-health" not in since_start, since_start[-3000:]
