"""meterproxy as a real process: for signals, restarts and several replicas sharing one store."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProxyProcess:
    """`python -m proxy serve` on a free port, with its config written to `config_path`."""

    def __init__(self, config: dict[str, Any], config_path: Path, *, workers: int = 1,
                 env: dict[str, str] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = config_path.with_suffix(f".{self.port}.log")

    def write_config(self, config: dict[str, Any] | None = None, text: str | None = None) -> None:
        self.config_path.write_text(text if text is not None else yaml.safe_dump(config or self.config))

    async def start(self, timeout: float = 20.0) -> ProxyProcess:
        self.write_config()
        cmd = [sys.executable, "-m", "proxy", "--log-format", "json", "serve", "--config", str(self.config_path),
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **self.env})
        await self.wait_healthy(timeout)
        return self

    async def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession() as s:
            while True:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"meterproxy exited with {self.proc.returncode}:\n{self.logs()}")
                try:
                    async with s.get(f"{self.url}/healthz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"meterproxy did not come up in {timeout}s:\n{self.logs()}")
                await asyncio.sleep(0.05)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        for _ in range(int(timeout * 20)):
            if self.proc.poll() is not None:
                return self.proc.returncode
            await asyncio.sleep(0.05)
        raise AssertionError(f"meterproxy did not exit in {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await self.wait_exit(15)
            except AssertionError:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()
