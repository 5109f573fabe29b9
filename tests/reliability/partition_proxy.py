"""A TCP proxy that can cut the network between its clients and one server, and heal it (the partition tests)."""

from __future__ import annotations

import select
import socket
import threading


class PartitionProxy:
    """Relays 127.0.0.1:``listen_port`` to 127.0.0.1:``target_port``, one pair of threads per connection.

    :meth:`partition` stops every byte in both directions without closing anything, as a cut cable or a dropped
    route does: no reset, no end of stream, requests simply get no answer (new connections are accepted by the
    kernel and then hear nothing). :meth:`heal` lets traffic flow again; bytes sent meanwhile are delivered then,
    as TCP would once its retransmissions get through.
    """

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.target_port = target_port
        self._open = threading.Event()
        self._open.set()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", listen_port))
        self._server.settimeout(0.2)
        self._acceptor = threading.Thread(target=self._accept, name="partition-proxy", daemon=True)
        self._acceptor.start()

    def partition(self) -> None:
        """Cut the network: nothing crosses until :meth:`heal`."""
        self._open.clear()

    def heal(self) -> None:
        """Let traffic through again."""
        self._open.set()

    def close(self) -> None:
        """Stop relaying and close every connection (the port is free again when this returns)."""
        self._stopped.set()
        self._open.set()
        self._acceptor.join(5)  # a socket closed while another thread waits on it would stay bound
        self._server.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def _wait_open(self) -> bool:
        while not self._open.wait(0.2):
            if self._stopped.is_set():
                return False
        return not self._stopped.is_set()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        if not self._wait_open():
            client.close()
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)  # blocking, as the client side: see _pump
        with self._lock:
            self._sockets += [client, upstream]
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        # Blocking sockets, readiness polled: a socket timeout would also bound ``sendall`` to a slow reader and
        # close the connection, which a partition never does.
        try:
            while self._wait_open():  # partitioned: read nothing, so the sender's buffers fill as on a dead link
                if not select.select([src], [], [], 0.2)[0]:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                if not self._wait_open():  # cut while this chunk was in flight: it waits for the heal
                    break
                dst.sendall(data)
        except (OSError, ValueError):  # closed by close(), or by the other direction's pump
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
