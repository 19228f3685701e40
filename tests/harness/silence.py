"""A TCP relay whose open connections can be made to go silent, while new ones keep working.

This is what an idle connection dropped by a NAT or a load balancer, or a Redis failover behind a
virtual IP, looks like to a client: its sockets stay open, nothing it sends gets an answer, nothing
arrives, and no error is ever raised; a connection it opens afresh works. ``silence()`` stops
relaying every connection open at that moment (in both directions, without closing either side);
connections accepted afterwards are relayed as before. Unlike a real black hole, the relay's kernel
still acknowledges what the client sends, so TCP keepalives cannot see the silence: only the
client's own application-level timeouts and watchdogs can.

It runs as a thread of the test process, one ``selectors`` loop, stopped by ``close()``.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading


class SilenceableRelay:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        #: socket -> its other end, for every connection being relayed.
        self._peer: dict[socket.socket, socket.socket] = {}
        #: Sockets of silenced connections: open, unread, never written to.
        self._silent: list[socket.socket] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._closed = False
        self.silenced = 0
        #: Connections accepted so far: a client that reconnects opens new ones.
        self.accepted = 0
        self._thread = threading.Thread(target=self._loop, name="silenceable-relay", daemon=True)
        self._thread.start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def silence(self) -> int:
        """Every connection open now goes silent; returns how many did."""
        with self._lock:
            for sock in list(self._peer):
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(sock)
                self._silent.append(sock)
            count = len(self._peer) // 2
            self._peer.clear()
            self.silenced += count
        self._wake_w.send(b"x")
        return count

    def open_connections(self) -> int:
        with self._lock:
            return len(self._peer) // 2

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(5)
        with self._lock:
            for sock in [*self._peer, *self._silent, self._listener, self._wake_r, self._wake_w]:
                with contextlib.suppress(OSError):
                    sock.close()
            self._peer.clear()
            self._silent.clear()
        self._selector.close()

    def _loop(self) -> None:
        while not self._closed:
            for key, _ in self._selector.select(1.0):
                sock = key.fileobj
                if sock is self._wake_r:
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(64)
                elif sock is self._listener:
                    self._accept()
                else:
                    self._relay(sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        with self._lock:
            self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                a.setblocking(False)
                self._peer[a] = b
                self._selector.register(a, selectors.EVENT_READ, None)

    def _relay(self, sock: socket.socket) -> None:
        with self._lock:
            other = self._peer.get(sock)
            if other is None:  # silenced meanwhile
                return
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data:
                try:
                    other.setblocking(True)
                    other.sendall(data)
                    other.setblocking(False)
                    return
                except OSError:
                    pass
            for s in (sock, other):  # one side closed: close the other, as a relay does
                self._peer.pop(s, None)
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(s)
                with contextlib.suppress(OSError):
                    s.close()
