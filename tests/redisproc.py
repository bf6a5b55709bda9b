"""Throwaway `redis-server` processes for tests: one server, or a three-node Redis Cluster.

`start_redis(tmp)` and `start_cluster(tmp)` spawn servers on free 127.0.0.1 ports. Opt-in fallback:
with METERPROXY_TEST_USE_REDIS_URL=1, `start_redis` uses the server at REDIS_URL and
`start_cluster` the one at REDIS_CLUSTER_URL instead (such servers cannot be killed or restarted,
so fault tests pass `external=False`). A missing `redis-server` fails the test; it never skips.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import pytest

from proxy.quota.resp import pack

T = TypeVar("T")

START_TIMEOUT_SECONDS = 10.0


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; the redis tests need it (apt-get install "
                    f"redis-server, or set REDIS_URL with METERPROXY_TEST_USE_REDIS_URL=1)",
                    pytrace=False)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000, at most 65535) is free too."""
    for _ in range(200):
        port = free_port()
        if port <= 55535 and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _command(port: int, *words: str, timeout: float = 1.0) -> str:
    """Send one inline command and return its reply (no redis client: these helpers are sync)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall((" ".join(words) + "\r\n").encode())
        data = b""
        while True:
            head, sep, body = data.partition(b"\r\n")
            if sep and not head.startswith(b"$"):
                return head.decode(errors="replace")
            if sep and len(body) >= int(head[1:]) + 2:
                return body.decode(errors="replace")
            chunk = sock.recv(65536)
            if not chunk:
                return data.decode(errors="replace")
            data += chunk


def _wait(predicate: object, what: str, log: Path | None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.02)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    pytest.fail(f"timed out waiting for {what}\n{tail}", pytrace=False)


@dataclass
class RedisProc:
    """One redis-server; `kill()` and `restart()` are for fault tests."""

    port: int
    workdir: Path
    extra_args: tuple[str, ...] = ()
    external_url: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return self.external_url or f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.workdir / "redis.log"

    def spawn(self) -> None:
        if self.external_url:
            raise RuntimeError("an external REDIS_URL server cannot be started by the tests")
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [_binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                "--logfile", str(self.log), *self.extra_args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        _wait(lambda: self._alive() and _command(self.port, "PING").startswith("+PONG"),
              f"redis-server on port {self.port} to answer PING", self.log)

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            pytest.fail(f"redis-server on port {self.port} exited\n{tail}", pytrace=False)
        return True

    def kill(self) -> None:
        """SIGKILL: the server vanishes without closing anything, like a crashed host."""
        if self.external_url:
            raise RuntimeError("cannot kill an external REDIS_URL server")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def pause(self) -> None:
        """SIGSTOP: connections open but nothing answers, like a hung host."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        if self.external_url or self.proc is None:
            raise RuntimeError("only a spawned redis-server can be signalled")
        self.proc.send_signal(sig)

    def restart(self) -> None:
        self.kill()
        self.spawn()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


def _external(var: str) -> str | None:
    if os.environ.get("METERPROXY_TEST_USE_REDIS_URL") == "1":
        url = os.environ.get(var)
        if not url:
            pytest.fail(f"METERPROXY_TEST_USE_REDIS_URL=1 but {var} is not set", pytrace=False)
        return url
    return None


def start_redis(tmp_path: Path, *, external: bool = True) -> RedisProc:
    """A fresh redis-server on a free port (or REDIS_URL when opted in and `external`)."""
    url = _external("REDIS_URL") if external else None
    if url:
        return RedisProc(port=0, workdir=tmp_path, external_url=url)
    server = RedisProc(port=free_port(), workdir=tmp_path / "redis")
    server.spawn()
    return server


def start_socket_redis(tmp_path: Path) -> tuple[RedisProc, Path]:
    """A fresh redis-server that also listens on a unix socket, and the socket's path (kept short:
    a socket path is limited to ~107 bytes)."""
    sock = tmp_path / "r.sock"
    server = RedisProc(port=free_port(), workdir=tmp_path / "redis",
                       extra_args=("--unixsocket", str(sock), "--unixsocketperm", "700"))
    server.spawn()
    return server, sock


@dataclass
class ClusterProc:
    nodes: list[RedisProc]
    external_url: str | None = None

    @property
    def url(self) -> str:
        return self.external_url or self.nodes[0].url

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_cluster(tmp_path: Path, n: int = 3) -> ClusterProc:
    """`n` primaries, no replicas, slots spread by `redis-cli --cluster create`."""
    url = _external("REDIS_CLUSTER_URL")
    if url:
        return ClusterProc([], external_url=url)
    nodes: list[RedisProc] = []
    cluster = ClusterProc(nodes)
    try:
        for _ in range(n):
            port = free_cluster_port()
            node = RedisProc(port=port, workdir=tmp_path / f"node-{port}", extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "2000"))
            node.spawn()
            nodes.append(node)
        created = subprocess.run(
            [_binary("redis-cli"), "--cluster", "create",
             *(f"127.0.0.1:{node.port}" for node in nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=START_TIMEOUT_SECONDS * 3, text=True)
        if created.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed:\n{created.stdout}\n{created.stderr}",
                        pytrace=False)
        for node in nodes:
            _wait(lambda p=node.port: "cluster_state:ok" in _command(p, "CLUSTER", "INFO"),
                  f"cluster_state:ok on port {node.port}", node.log)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@dataclass(frozen=True)
class Ran:
    """One command Redis ran, as MONITOR shows it."""

    args: list[str]
    from_script: bool  # run by a Lua script, not sent by a client

    @property
    def name(self) -> str:
        return self.args[0].lower()


async def _raw_connection(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    if parts.password:  # a REDIS_URL with credentials
        writer.write(pack(("AUTH", *([parts.username] if parts.username else []), parts.password)))
        assert await reader.readline() == b"+OK\r\n"
    return reader, writer


async def monitored(url: str, action: Awaitable[T]) -> tuple[T, list[Ran]]:
    """`action`'s result and every command Redis ran while it ran, in order, scripts' own
    included. Both of our connections (MONITOR, and the one whose ECHO ends the capture) are open
    before the action starts, so no handshake of ours shows up among them."""
    reader, writer = await _raw_connection(url)
    marker_reader, marker_writer = await _raw_connection(url)
    try:
        writer.write(b"MONITOR\r\n")
        assert await reader.readline() == b"+OK\r\n"
        result = await action
        end = uuid.uuid4().hex
        marker_writer.write(pack(("ECHO", end)))
        await marker_reader.readline()
        ran: list[Ran] = []
        while True:
            line = (await asyncio.wait_for(reader.readline(), 5)).decode()
            args = [a.replace('\\"', '"') for a in re.findall(r'"((?:[^"\\]|\\.)*)"', line)]
            if args == ["ECHO", end]:
                return result, ran
            ran.append(Ran(args, " lua]" in line))  # "+<time> [0 lua] ..." for a script's own
    finally:
        writer.close()
        marker_writer.close()
