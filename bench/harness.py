"""Process plumbing shared by the benchmark and the soak test.

Owns: free ports, starting and stopping the processes under test (pinned with taskset), the
meterproxy and LiteLLM config files, readiness checks, and reading CPU time and RSS from /proc.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BENCH_DIR = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

CHAT_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}],"max_tokens":16}'
CHAT_STREAM_BODY = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}],"max_tokens":16,'
    b'"stream":true,"stream_options":{"include_usage":true}}'
)
MESSAGES_BODY = b'{"model":"claude-3-5-haiku-latest","messages":[{"role":"user","content":"Say hello"}],"max_tokens":16}'
MESSAGES_STREAM_BODY = (
    b'{"model":"claude-3-5-haiku-latest","messages":[{"role":"user","content":"Say hello"}],'
    b'"max_tokens":16,"stream":true}'
)
TRUSTED_KEY = "sk-bench-trusted"


def key_name(i: int) -> str:
    return f"sk-bench-{i}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Pinning:
    """Which cores the load side (upstream, load generator, redis) and the proxy may use."""

    load: str | None  # taskset core list, None = no pinning
    proxy: str | None

    @staticmethod
    def choose(proxy_workers: int, enabled: bool = True) -> Pinning:
        n = cpu_count()
        if not enabled or n < 2 or shutil.which("taskset") is None:
            return Pinning(None, None)
        if proxy_workers >= n:
            # More workers than spare cores: everything shares every core (the load side too).
            return Pinning(None, None)
        return Pinning("0", ",".join(str(c) for c in range(1, proxy_workers + 1)))

    def wrap(self, cores: str | None, argv: Sequence[str]) -> list[str]:
        return ["taskset", "-c", cores, *argv] if cores else list(argv)


@dataclass
class Proc:
    """A process we started (in its own session so a multi-worker server can be stopped whole)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        pgid = self.popen.pid  # start_new_session=True made the process its group leader
        try:
            os.killpg(pgid, signal.SIGTERM)
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.popen.wait(timeout=5)
        except ProcessLookupError:
            pass
        # Workers of a multi-process server may outlive their parent for a moment.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Procs:
    """Every process a run started, stopped together at the end."""

    workdir: Path
    started: list[Proc] = field(default_factory=list)
    proxy_env: dict[str, str] = field(default_factory=dict)  # extra environment for meterproxy (LD_PRELOAD)

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.workdir / f"{name}.log"
        log = open(log_path, "wb")  # noqa: SIM115 - the child owns it for its lifetime
        popen = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        log.close()
        proc = Proc(name, popen, log_path)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()


class StartError(RuntimeError):
    pass


def wait_http(proc: Proc, port: int, method: str, path: str, body: bytes | None,
              headers: dict[str, str], timeout: float) -> None:
    """Poll until the request answers 200, or raise StartError with the process log."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise StartError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            if resp.status == 200:
                return
            last = f"HTTP {resp.status}: {data[:300]!r}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise StartError(f"{proc.name} not ready after {timeout:.0f}s ({last}):\n{proc.log_tail()}")


def start_fake(procs: Procs, pin: Pinning, port: int, extra: Sequence[str] = ()) -> Proc:
    argv = [sys.executable, str(BENCH_DIR / "fake_upstream.py"), "--port", str(port), *extra]
    proc = procs.spawn("fake_upstream", pin.wrap(pin.load, argv))
    wait_http(proc, port, "GET", "/healthz", None, {}, 15)
    return proc


def start_floor(procs: Procs, pin: Pinning, port: int, upstream_port: int) -> Proc:
    argv = [sys.executable, str(BENCH_DIR / "floor.py"), "--port", str(port),
            "--upstream", f"http://127.0.0.1:{upstream_port}"]
    proc = procs.spawn("floor", pin.wrap(pin.proxy, argv))
    wait_http(proc, port, "POST", "/v1/chat/completions", CHAT_BODY,
              {"content-type": "application/json"}, 20)
    return proc


def redis_socket(procs: Procs, port: int) -> Path:
    """Where `start_redis(..., unix=True)` puts the server's unix socket."""
    return procs.workdir / f"redis-{port}.sock"


def start_redis(procs: Procs, pin: Pinning, port: int, unix: bool = False) -> Proc:
    """A throwaway redis-server on `port`, and with `unix` also on a unix socket (`redis_socket`)."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise StartError("redis-server not found (apt-get install redis-server)")
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--daemonize", "no"]
    if unix:
        argv += ["--unixsocket", str(redis_socket(procs, port)), "--unixsocketperm", "700"]
    proc = procs.spawn(f"redis-{port}", pin.wrap(pin.load, argv))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.05)
    raise StartError(f"redis-server did not answer PING:\n{proc.log_tail()}")


def meterproxy_config(workdir: Path, name: str, upstream_port: int, store: str, keys: int) -> Path:
    """Write a meterproxy config with `keys` plain keys plus one trusted backend key."""
    base = f"http://127.0.0.1:{upstream_port}"
    config = {
        "listen": {"host": "127.0.0.1", "port": 8080},
        "store": store,
        "providers": {
            "openai": {"type": "openai", "base_url": base, "api_key": "sk-upstream-real"},
            "anthropic": {"type": "anthropic", "base_url": base, "api_key": "sk-ant-real"},
        },
        "models": {"gpt-*": "openai", "claude-*": "anthropic"},
        "ledger": {"path": str(workdir / f"{name}-usage.jsonl")},
        "default_plan": "bench",
        "plans": {"bench": {"rpm": 100_000_000, "tpm": 1_000_000_000_000}},
        "keys": [{"key": key_name(i), "user": f"bench-user-{i}"} for i in range(1, keys + 1)]
        + [{"key": TRUSTED_KEY, "user": "backend", "trusted_user_header": True}],
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


JEMALLOC_PATHS = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                  "/usr/local/lib/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2")


def malloc_env(kind: str) -> dict[str, str]:
    """Environment that makes meterproxy use `kind` of allocator: the C library's, or jemalloc
    (what the Docker image ships) preloaded."""
    if kind == "system":
        return {}
    for path in JEMALLOC_PATHS:
        if os.path.exists(path):
            return {"LD_PRELOAD": path}
    raise StartError("--malloc jemalloc: libjemalloc.so.2 not found (Debian: apt-get install -y libjemalloc2)")


def meterproxy_bin() -> str:
    return os.environ.get("METERPROXY_BIN") or str(Path(sys.executable).parent / "meterproxy")


def compile_bytecode(package: Path = BENCH_DIR.parent / "proxy") -> None:
    """Write this checkout's .pyc files, as `pip install` does for an installed copy (and the
    Docker image), so meterproxy starts from bytecode. Without them (an editable install under
    PYTHONDONTWRITEBYTECODE=1, as on these machines) every start compiles the sources in memory,
    which leaves about 1.4 MiB more resident (measured). Cheap when nothing changed: it compares
    timestamps. Another checkout run through `exe` compiles its own (`python -m compileall proxy`)."""
    import compileall

    if package.is_dir():
        compileall.compile_dir(str(package), quiet=1)


def start_meterproxy(procs: Procs, pin: Pinning, name: str, port: int, config: Path,
                     workers: int, timeout: float = 60, exe: str | None = None) -> Proc:
    compile_bytecode()
    argv = [exe or meterproxy_bin(), "serve", "--config", str(config), "--host", "127.0.0.1",
            "--port", str(port)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    env = {"TIKTOKEN_CACHE_DIR": os.environ.get("TIKTOKEN_CACHE_DIR", "/work/shared/tiktoken-cache"),
           **procs.proxy_env}
    proc = procs.spawn(name, pin.wrap(pin.proxy, argv), env=env)
    wait_http(proc, port, "GET", "/healthz", None, {}, timeout)
    wait_http(proc, port, "POST", "/openai/v1/chat/completions", CHAT_BODY,
              {"content-type": "application/json", "authorization": f"Bearer {key_name(1)}"}, 10)
    return proc


def litellm_config(workdir: Path, upstream_port: int) -> Path:
    base = f"http://127.0.0.1:{upstream_port}"
    config = {
        "model_list": [
            {"model_name": "gpt-4o-mini",
             "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": f"{base}/v1",
                                "api_key": "sk-upstream-real"}},
            {"model_name": "claude-3-5-haiku-latest",
             "litellm_params": {"model": "anthropic/claude-3-5-haiku-latest", "api_base": base,
                                "api_key": "sk-ant-real"}},
        ],
        "litellm_settings": {"drop_params": True, "telemetry": False},
        # LiteLLM refuses to start without a master key; the load generator's key is it.
        "general_settings": {"master_key": key_name(1)},
    }
    path = workdir / "litellm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_litellm(procs: Procs, pin: Pinning, exe: str, port: int, config: Path) -> Proc:
    argv = [exe, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
            "--num_workers", "1"]
    proc = procs.spawn("litellm", pin.wrap(pin.proxy, argv),
                       env={"LITELLM_TELEMETRY": "False", "LITELLM_LOG": "ERROR",
                            "LITELLM_LOCAL_MODEL_COST_MAP": "True"})  # no network here
    wait_http(proc, port, "POST", "/v1/chat/completions", CHAT_BODY,
              {"content-type": "application/json", "authorization": f"Bearer {key_name(1)}"}, 180)
    return proc


# --- /proc readings -----------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """root and all its descendants (a multi-worker server's workers are its children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    """Send `sig` to each pid that still exists."""
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the given processes (fields 14 and 15 of /proc/<pid>/stat)."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total
