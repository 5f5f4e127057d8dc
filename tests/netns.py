"""Hosts with networks of their own, on one machine: each worker runs in a Linux network namespace
joined to this one by a veth pair, and reaches PostgreSQL over TCP, as a worker on another machine
would. The test server listens on a Unix socket only, so a small forwarder in the test process accepts
TCP on each host's link and relays it to that socket (or to a PgBouncer on this machine's loopback).

A partition is silent, as a broken path through a router is: a ``blackhole`` queueing discipline on
both ends of the link drops every packet, no RST comes back, and the neighbour entries are pinned
(``nud permanent``) so the kernel does not turn the silence into a quick "no route to host" either.

Needs root and ``ip netns``; :func:`unavailable` says why not, for the tests to skip with that reason.
Names start with ``pgqc-`` and addresses come from 10.231.0.0/16, a /24 per test run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading

from tests.helpers import WorkerProcess

PORT = 5431
_RUN = os.getpid() % 10000


def _ip(*args: str, namespace: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    prefix = ["ip", "-n", namespace] if namespace else ["ip"]
    return subprocess.run([*prefix, *args], capture_output=True, text=True, check=check, timeout=20)


def _tc(*args: str, namespace: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    prefix = ["ip", "netns", "exec", namespace, "tc"] if namespace else ["tc"]
    return subprocess.run([*prefix, *args], capture_output=True, text=True, check=check, timeout=20)


_why_not: list[str | None] = []


def unavailable() -> str | None:
    """Why hosts cannot be made here (not root, no ``ip``, namespaces refused), or None."""
    if _why_not:
        return _why_not[0]
    reason = None
    if os.geteuid() != 0:
        reason = "network namespaces need root"
    elif shutil.which("ip") is None or shutil.which("tc") is None:
        reason = "the ip and tc commands (iproute2) are not installed"
    else:
        probe = f"pgqc-probe-{_RUN}"
        try:
            made = _ip("netns", "add", probe, check=False)
            if made.returncode != 0:
                reason = f"ip netns add failed: {made.stderr.strip()}"
            else:
                qdisc = _tc("qdisc", "add", "dev", "lo", "root", "blackhole", namespace=probe, check=False)
                if qdisc.returncode != 0:
                    reason = f"the blackhole queueing discipline is not available: {qdisc.stderr.strip()}"
        except (OSError, subprocess.SubprocessError) as exc:
            reason = f"ip netns failed: {exc}"
        finally:
            _ip("netns", "del", probe, check=False)
    _why_not.append(reason)
    return reason


class Forwarder:
    """Accepts TCP on (*address*, *port*) and relays each connection to *target*: a Unix socket's path, or
    (host, port) on this machine's loopback (a PgBouncer).

    Its sockets toward the hosts probe an idle peer (keepalive after 2 s, every 1 s, 3 probes) and give
    up on data left unacknowledged for 5 s, as a PostgreSQL server with ``tcp_keepalives_idle = 2``,
    ``tcp_keepalives_interval = 1``, ``tcp_keepalives_count = 3`` and ``tcp_user_timeout = 5000`` would:
    a session whose client vanished behind a partition then ends on the server instead of lingering for
    hours (the kernel's defaults: 2 hours of silence before the first probe).
    """

    def __init__(self, address: str, port: int, target: str | tuple[str, int]):
        self.target = target
        self._listener = socket.create_server((address, port))
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name=f"forward-{address}").start()

    def open_connections(self) -> int:
        with self._lock:
            return len(self._pairs)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            client.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 2)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 5000)
            server = socket.socket(socket.AF_UNIX if isinstance(self.target, str) else socket.AF_INET)
            try:
                server.connect(self.target)
            except OSError:
                client.close()
                server.close()
                continue
            pair = (client, server)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._pairs.add(pair)
            done = threading.Barrier(2, action=lambda p=pair: self._end(p))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst, done), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, done: threading.Barrier) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        # Either side gone: end both, so the other pump's recv returns too.
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(threading.BrokenBarrierError):
            done.wait(timeout=60)

    def _end(self, pair: tuple[socket.socket, socket.socket]) -> None:
        with self._lock:
            self._pairs.discard(pair)
        for s in pair:
            s.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pairs = list(self._pairs)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in progress, which close() does not
        self._listener.close()
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


class Host:
    """A network namespace with one link to this machine, where worker processes run."""

    def __init__(self, network: Network, index: int):
        self.name = f"pgqc-h{index}-{os.getpid()}"
        self.outside = f"pgqc{_RUN}h{index}a"  # the link's end on this machine
        self.inside = f"pgqc{_RUN}h{index}b"  # its end in the namespace
        self.gateway = f"10.231.{network.subnet}.{4 * index + 1}"
        self.address = f"10.231.{network.subnet}.{4 * index + 2}"
        self.partitioned = False
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.outside, "type", "veth", "peer", "name", self.inside, "netns", self.name)
            _ip("addr", "add", f"{self.gateway}/30", "dev", self.outside)
            _ip("link", "set", self.outside, "up")
            _ip("addr", "add", f"{self.address}/30", "dev", self.inside, namespace=self.name)
            _ip("link", "set", self.inside, "up", namespace=self.name)
            _ip("link", "set", "lo", "up", namespace=self.name)
            inside_mac = _ip("-br", "link", "show", self.inside, namespace=self.name).stdout.split()[2]
            outside_mac = _ip("-br", "link", "show", self.outside).stdout.split()[2]
            _ip("neigh", "replace", self.address, "lladdr", inside_mac, "dev", self.outside, "nud", "permanent")
            _ip("neigh", "replace", self.gateway, "lladdr", outside_mac, "dev", self.inside, "nud", "permanent",
                namespace=self.name)
            self.forwarder = Forwarder(self.gateway, PORT, network.target)
        except BaseException:
            self.remove()
            raise

    def url(self, dbname: str, user: str) -> str:
        """The database URL as this host sees it."""
        return f"postgresql://{user}@{self.gateway}:{PORT}/{dbname}"

    def partition(self) -> None:
        """Drop every packet on the link, both ways, without a word."""
        _tc("qdisc", "replace", "dev", self.outside, "root", "blackhole")
        _tc("qdisc", "replace", "dev", self.inside, "root", "blackhole", namespace=self.name)
        self.partitioned = True

    def heal(self) -> None:
        _tc("qdisc", "del", "dev", self.outside, "root", check=False)
        _tc("qdisc", "del", "dev", self.inside, "root", namespace=self.name, check=False)
        self.partitioned = False

    def command(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def remove(self) -> None:
        forwarder = getattr(self, "forwarder", None)
        if forwarder is not None:
            forwarder.close()
        _ip("link", "del", self.outside, check=False)
        _ip("netns", "del", self.name, check=False)


def _remove_stale() -> None:
    """Remove the namespaces of test runs that died without cleaning up (their veth links go with them),
    so their addresses do not collide with this run's."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    for line in listed:
        name = line.split(" ")[0]
        if name.startswith("pgqc-h") and name.rsplit("-", 1)[-1].isdigit():
            pid = int(name.rsplit("-", 1)[-1])
            if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
                _ip("netns", "del", name, check=False)


class Network:
    """The hosts of one test; :meth:`close` removes them all."""

    _made = 0

    def __init__(self, target: str | tuple[str, int]):
        """Hosts whose link leads to *target* (see Forwarder)."""
        _remove_stale()
        self.target = target
        self.worker_args: tuple[str, ...] = ()  # what workers on these hosts need (--no-listen behind PgBouncer)
        Network._made += 1
        self.subnet = (_RUN + Network._made) % 250 + 1
        self.hosts: list[Host] = []

    def host(self) -> Host:
        host = Host(self, len(self.hosts))
        self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in self.hosts:
            host.remove()
        self.hosts.clear()


class HostWorker(WorkerProcess):
    """A ``pgq worker`` process run on *host* (``ip netns exec`` execs it in place, so its pid is the
    worker's own), with its output in a file."""

    def __init__(self, host: Host, url: str, *args: str, app: str = "tests.fault_apps",
                 env: dict[str, str] | None = None):
        super().__init__(url, *args, app=app, env=env, prefix=tuple(host.command()))
        self.host = host

    def stop(self, timeout: float = 20.0) -> str:
        return super().stop(timeout)
