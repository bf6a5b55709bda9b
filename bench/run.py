"""Benchmark meterproxy against a fake upstream, a bare aiohttp forwarder (the floor) and LiteLLM.

All targets run in the same invocation, in alternating rounds, so machine noise hits all alike.
Plain requests are driven by wrk (closed loop), streams by a small asyncio client. Prints a
Markdown table; exits non-zero when any target fails to serve (or, with --strict, misses a goal).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import harness as h
from loadgen import Identity, StreamResult, WrkResult, run_streams, run_wrk, wrk_script

ALL_TARGETS = ("direct", "floor", "memory", "redis", "litellm")
PHASES = ("rps", "latency", "stream")
SMOKE_PHASES = ("rps", "stream")  # enough to prove each target serves plain requests and streams
MIB = 1024 * 1024


@dataclass
class Target:
    name: str
    port: int
    path: str  # request path for the chosen API
    proc: h.Proc | None  # None for direct: nothing sits between client and upstream
    ident: Identity
    script: Path  # the wrk Lua script for this target's identity
    store: h.Proc | None = None  # the redis-server a redis target owns: its CPU is reported apart
    samples: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    rss_bytes: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def pids(self) -> list[int]:
        return h.process_tree(self.proc.pid) if self.proc else []


class Quiet:
    """Keeps every target process but the measured one stopped (SIGSTOP): an idle proxy still runs
    timers and background tasks (LiteLLM many), and on the proxy core they land in the measured
    target's latency. A target is stopped only after a moment for what its last phase left in
    flight (wrk hangs up at the end, its proxy may still be waiting on the upstream or Redis):
    frozen mid-request, its timers would fire on resume and count a Redis call or an upstream
    attempt as timed out (seen: a fail-open admit, and once an upstream breaker opened for 30 s).
    A resumed target gets a moment for the timers that fell due while it was stopped, outside its
    measurement. The fake upstream and the redis-servers keep running."""

    def __init__(self, targets: list[Target], enabled: bool, settle_s: float = 0.25) -> None:
        self._targets = [t for t in targets if t.proc is not None]
        self._enabled = enabled
        self._settle_s = settle_s
        self._stopped: set[str] = set()

    def only(self, target: Target) -> None:
        if not self._enabled:
            return
        running = [t for t in self._targets if t is not target and t.name not in self._stopped]
        if running:
            time.sleep(self._settle_s)  # their last requests finish before they are frozen
        for t in running:
            h.signal_all(t.pids(), signal.SIGSTOP)
            self._stopped.add(t.name)
        if target.name in self._stopped:
            h.signal_all(target.pids(), signal.SIGCONT)
            self._stopped.discard(target.name)
            time.sleep(self._settle_s)

    def release(self) -> None:
        """Let every target run again (a stopped process cannot act on SIGTERM)."""
        for t in self._targets:
            if t.name in self._stopped:
                h.signal_all(t.pids(), signal.SIGCONT)
        self._stopped.clear()


@dataclass(frozen=True)
class Plan:
    duration_s: int
    rounds: int
    warmup_s: int
    conns: int
    latency_conns: int
    stream_conns: int
    api: str
    load_cores: str | None
    phases: tuple[str, ...] = ("rps", "latency", "stream")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Environment: LITELLM_BIN=/path/to/litellm adds the LiteLLM target; "
        "METERPROXY_BIN overrides the meterproxy executable (default: next to this Python).",
    )
    p.add_argument("--duration", type=int, default=5, help="seconds per measured phase (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians reported (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of unmeasured load per target first")
    p.add_argument("--only", default="", help=f"comma list of targets from {','.join(ALL_TARGETS)}; "
                   "direct always runs (it is the baseline for added latency)")
    p.add_argument("--smoke", action="store_true",
                   help="quick check (~15 s): 1 s phases, 1 round, no warm-up, no 1-connection latency "
                   "phase; exits 1 if any target fails to serve")
    p.add_argument("--users", type=_int_list, default=[0],
                   help="rotate x-meterproxy-user over N end users through a trusted key; a comma "
                   "list (10,100000) runs one meterproxy per value in the same run")
    p.add_argument("--keys", type=_int_list, default=[1],
                   help="configure N virtual keys and rotate the load across them; a comma list "
                   "(10,10000) runs one meterproxy per value in the same run")
    p.add_argument("--workers", type=int, default=1, help="meterproxy --workers N")
    p.add_argument("--api", choices=("openai", "anthropic"), default="openai",
                   help="chat completions or messages (default openai)")
    p.add_argument("--conns", type=int, default=64, help="connections for the throughput phase")
    p.add_argument("--stream-conns", type=int, default=16, help="connections for the stream phase")
    p.add_argument("--upstream-latency-ms", type=float, default=0.0)
    p.add_argument("--chunk-interval-ms", type=float, default=0.0)
    p.add_argument("--stream-tokens", type=int, default=10)
    p.add_argument("--malloc", choices=("system", "jemalloc"), default="system",
                   help="meterproxy's allocator: the C library's (a pip install), or jemalloc preloaded, "
                        "as the Docker image ships it (needs libjemalloc2)")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--redis-socket", action="store_true",
                   help="the redis store reaches its redis-server over a unix socket (store: unix://...), "
                        "as a Redis on the same host may be, instead of TCP on 127.0.0.1")
    p.add_argument("--no-pause", action="store_true",
                   help="leave the targets not being measured running (by default they are stopped with "
                        "SIGSTOP, so their idle timers do not run on the measured target's core)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a goal from issue 8 is missed")
    p.add_argument("--json", type=Path, help="also write raw samples and the summary here")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs, ledgers)")
    args = p.parse_args(argv)
    if len(args.users) > 1 and len(args.keys) > 1:
        p.error("give a list to --users or to --keys, not to both")
    if args.smoke:
        args.duration, args.rounds, args.warmup = 1, 1, 0
    return args


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values


def identities(args: argparse.Namespace) -> list[Identity]:
    """One identity per scaling variant (a single one unless --users or --keys got a list)."""
    return [Identity(keys=max(1, k), users=max(0, u)) for u in args.users for k in args.keys]


def variant_label(ident: Identity, several: bool) -> str:
    if not several:
        return ""
    return f" users={ident.users}" if ident.users else f" keys={ident.keys}"


def selected_targets(only: str) -> list[str]:
    if not only:
        return list(ALL_TARGETS)
    wanted = {t.strip() for t in only.split(",") if t.strip()}
    unknown = wanted - set(ALL_TARGETS)
    if unknown:
        sys.exit(f"unknown target(s): {', '.join(sorted(unknown))}")
    return [t for t in ALL_TARGETS if t == "direct" or t in wanted]


def api_paths(api: str) -> tuple[str, str, bytes, bytes]:
    """(plain path, meterproxy prefix, body, stream body) for the chosen API."""
    if api == "openai":
        return "/v1/chat/completions", "/openai", h.CHAT_BODY, h.CHAT_STREAM_BODY
    return "/v1/messages", "/anthropic", h.MESSAGES_BODY, h.MESSAGES_STREAM_BODY


# --- starting ----------------------------------------------------------------------------


def start_targets(args: argparse.Namespace, names: list[str], procs: h.Procs, pin: h.Pinning,
                  upstream_port: int, body: bytes) -> tuple[list[Target], list[str]]:
    """Start every selected target in parallel; a target that fails to start is reported, not fatal.

    meterproxy targets are started once per identity variant, so scaling is compared in one run.
    """
    path, prefix, _, _ = api_paths(args.api)
    workdir = procs.workdir
    idents = identities(args)
    several = len(idents) > 1
    # name -> (starter, identity, path)
    plans: dict[str, tuple[Callable[[int], h.Proc], Identity, str]] = {}
    stores: dict[str, h.Proc] = {}  # target name -> its redis-server, filled as targets start
    if "floor" in names:
        plans["floor"] = (lambda port: h.start_floor(procs, pin, port, upstream_port), idents[0], path)
    for n, ident in enumerate(idents):
        label = variant_label(ident, several)
        slug = f"-{n}" if several else ""
        if "memory" in names:
            cfg = h.meterproxy_config(workdir, f"memory{slug}", upstream_port, "memory", ident.keys)
            plans["memory" + label] = (_meterproxy_starter(procs, pin, f"memory{slug}", cfg, args.workers),
                                       ident, prefix + path)
        if "redis" in names:
            plans["redis" + label] = (_redis_starter(procs, pin, f"redis{slug}", upstream_port, ident.keys,
                                                     args.workers, stores, "redis" + label, args.redis_socket),
                                      ident, prefix + path)
    litellm_bin = os.environ.get("LITELLM_BIN")
    if "litellm" in names and litellm_bin:
        cfg_l = h.litellm_config(workdir, upstream_port)
        plans["litellm"] = (lambda port: h.start_litellm(procs, pin, litellm_bin, port, cfg_l), idents[0], path)

    def script(ident: Identity) -> Path:
        return wrk_script(workdir / f"load-k{ident.keys}-u{ident.users}.lua", body, ident)

    targets = [Target("direct", upstream_port, path, None, idents[0], script(idents[0]))]
    problems: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, len(plans))) as pool:
        ports = {name: h.free_port() for name in plans}
        futures = {name: pool.submit(fn, ports[name]) for name, (fn, _, _) in plans.items()}
        for name, (_, ident, tpath) in plans.items():
            try:
                proc = futures[name].result()
            except (h.StartError, OSError) as exc:
                problems.append(f"{name}: failed to start: {exc}")
                continue
            targets.append(Target(name, ports[name], tpath, proc, ident, script(ident), stores.get(name)))
    return targets, problems


def _meterproxy_starter(procs: h.Procs, pin: h.Pinning, name: str, cfg: Path,
                        workers: int) -> Callable[[int], h.Proc]:
    return lambda port: h.start_meterproxy(procs, pin, name, port, cfg, workers)


def _redis_starter(procs: h.Procs, pin: h.Pinning, name: str, upstream_port: int, keys: int,
                   workers: int, stores: dict[str, h.Proc], target: str,
                   socket: bool) -> Callable[[int], h.Proc]:
    def start(port: int) -> h.Proc:
        rport = h.free_port()
        stores[target] = h.start_redis(procs, pin, rport, socket)
        url = f"unix://{h.redis_socket(procs, rport)}" if socket else f"redis://127.0.0.1:{rport}/0"
        cfg = h.meterproxy_config(procs.workdir, name, upstream_port, url, keys)
        return h.start_meterproxy(procs, pin, name, port, cfg, workers)
    return start


# --- measuring ---------------------------------------------------------------------------


def measure(target: Target, phase: str, plan: Plan, stream_body: bytes) -> None:
    pids = target.pids()
    cpu0 = h.cpu_seconds(pids)
    store_pids = [target.store.pid] if target.store else []
    store_cpu0 = h.cpu_seconds(store_pids)
    t0 = time.perf_counter()
    sample: dict[str, float]
    if phase == "rps":
        r = run_wrk(target.url, target.script, plan.conns, plan.duration_s, plan.load_cores)
        sample = {"rps": r.rps, "requests": r.requests, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms}
        _check_wrk(target, phase, r)
        count = r.requests
    elif phase == "latency":
        r = run_wrk(target.url, target.script, plan.latency_conns, plan.duration_s, plan.load_cores)
        sample = {"requests": r.requests, "p50_ms": r.p50_ms, "p90_ms": r.p90_ms, "p99_ms": r.p99_ms,
                  "mean_ms": r.mean_ms}
        _check_wrk(target, phase, r)
        count = r.requests
    else:
        s = _run_stream_phase(target, plan, stream_body)
        sample = {"streams_per_s": s.rate, "streams": s.streams, "ttft_p50_ms": s.ttft_p50_ms,
                  "ttft_p99_ms": s.ttft_p99_ms, "total_p50_ms": s.total_p50_ms,
                  "missing_usage": s.missing_usage}
        if s.errors or s.missing_usage or s.streams == 0:
            target.failures.append(
                f"stream: {s.errors} errors, {s.missing_usage} without usage, {s.streams} ok; {s.first_error}"
            )
        count = s.streams
    elapsed = time.perf_counter() - t0
    if pids:
        cpu_s = h.cpu_seconds(pids) - cpu0
        sample["cpu_ms_per_req"] = cpu_s * 1000 / count if count else float("nan")
        sample["cpu_util"] = cpu_s / elapsed
    if store_pids and count:
        sample["store_cpu_ms_per_req"] = (h.cpu_seconds(store_pids) - store_cpu0) * 1000 / count
    target.samples.setdefault(phase, []).append(sample)


def _check_wrk(target: Target, phase: str, r: WrkResult) -> None:
    if r.requests == 0 or r.error_count:
        target.failures.append(f"{phase}: {r.requests} requests, errors {r.errors}")


def _run_stream_phase(target: Target, plan: Plan, body: bytes) -> StreamResult:
    coro = run_streams(target.port, target.path, body, target.ident, plan.api, plan.stream_conns,
                       plan.duration_s)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def warm_up(target: Target, plan: Plan) -> None:
    if plan.warmup_s > 0:
        run_wrk(target.url, target.script, plan.conns, plan.warmup_s, plan.load_cores)


# --- reporting ---------------------------------------------------------------------------


def med(target: Target, phase: str, key: str) -> float:
    values = [s[key] for s in target.samples.get(phase, []) if key in s and not math.isnan(s[key])]
    return statistics.median(values) if values else float("nan")


def added(target: Target, direct: Target, key: str) -> float:
    """Median over rounds of (target - direct) in the same round."""
    pairs = zip(target.samples.get("latency", []), direct.samples.get("latency", []), strict=False)
    diffs = [t[key] - d[key] for t, d in pairs]
    return statistics.median(diffs) if diffs else float("nan")


def fmt(value: float, digits: int = 0, suffix: str = "", signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:{'+' if signed else ''},.{digits}f}{suffix}"


def summarize(targets: list[Target]) -> dict[str, dict[str, float]]:
    by_name = {t.name: t for t in targets}
    direct, floor = by_name["direct"], by_name.get("floor")
    out: dict[str, dict[str, float]] = {}
    for t in targets:
        row = {
            "rps": med(t, "rps", "rps"),
            "p50_ms": med(t, "latency", "p50_ms"),
            "p99_ms": med(t, "latency", "p99_ms"),
            "added_p50_ms": added(t, direct, "p50_ms") if t is not direct else 0.0,
            "added_p99_ms": added(t, direct, "p99_ms") if t is not direct else 0.0,
            "streams_per_s": med(t, "stream", "streams_per_s"),
            "ttft_p50_ms": med(t, "stream", "ttft_p50_ms"),
            "cpu_ms_per_req": med(t, "rps", "cpu_ms_per_req"),
            "cpu_ms_per_stream": med(t, "stream", "cpu_ms_per_req"),
            "store_cpu_ms_per_req": med(t, "rps", "store_cpu_ms_per_req"),
            "cpu_util_rps": med(t, "rps", "cpu_util"),
            "cpu_util_stream": med(t, "stream", "cpu_util"),
            "rss_mib": t.rss_bytes / MIB if t.proc else float("nan"),
        }
        if floor is not None:
            row["rps_x_floor"] = row["rps"] / med(floor, "rps", "rps")
            row["stream_x_floor"] = row["streams_per_s"] / med(floor, "stream", "streams_per_s")
        out[t.name] = row
    return out


def table(summary: dict[str, dict[str, float]], targets: list[Target], plan: Plan) -> str:
    head = (
        f"| target | RPS @{plan.conns} | × floor | p50 @1 (ms) | p99 @1 (ms) | added p50 / p99 (ms) "
        f"| streams/s @{plan.stream_conns} | × floor | TTFT p50 @{plan.stream_conns} (ms) "
        f"| CPU ms/req | CPU ms/stream | Redis CPU ms/req | busy @{plan.conns} | busy @{plan.stream_conns} "
        f"| RSS (MiB) | status |"
    )
    lines = [head, "|" + "---|" * 16]
    for t in targets:
        r = summary[t.name]
        added_cell = "—" if t.name == "direct" else (
            f"{fmt(r['added_p50_ms'], 2, signed=True)} / {fmt(r['added_p99_ms'], 2, signed=True)}")
        lines.append(
            f"| {t.name} | {fmt(r['rps'])} | {fmt(r.get('rps_x_floor', math.nan), 2)} "
            f"| {fmt(r['p50_ms'], 2)} | {fmt(r['p99_ms'], 2)} | {added_cell} "
            f"| {fmt(r['streams_per_s'])} | {fmt(r.get('stream_x_floor', math.nan), 2)} "
            f"| {fmt(r['ttft_p50_ms'], 2)} | {fmt(r['cpu_ms_per_req'], 3)} "
            f"| {fmt(r['cpu_ms_per_stream'], 3)} | {fmt(r['store_cpu_ms_per_req'], 3)} "
            f"| {fmt(r['cpu_util_rps'] * 100, 0, '%')} "
            f"| {fmt(r['cpu_util_stream'] * 100, 0, '%')} "
            f"| {fmt(r['rss_mib'], 0)} "
            f"| {'ok' if not t.failures else 'FAILED'} |"
        )
    return "\n".join(lines)


def goals(summary: dict[str, dict[str, float]]) -> list[tuple[bool, str]]:
    """The 'Must show' numbers of issue 8 that one run can check."""
    out: list[tuple[bool, str]] = []
    floor, lite = summary.get("floor"), summary.get("litellm")
    rss_cap = 100.0
    for name, rps_min, p50_slack in (("memory", 0.6, 0.3), ("redis", 0.4, 0.6)):
        r = summary.get(name)
        if r is None:
            continue
        if floor is not None:
            out.append((r["rps_x_floor"] >= rps_min, f"{name}: RPS {r['rps_x_floor']:.2f}× floor (goal ≥ {rps_min})"))
            out.append((r["stream_x_floor"] >= 0.6, f"{name}: streams {r['stream_x_floor']:.2f}× floor (goal ≥ 0.6)"))
            lim = floor["added_p50_ms"] + p50_slack
            out.append((r["added_p50_ms"] <= lim,
                        f"{name}: added p50 {r['added_p50_ms']:.2f} ms (goal ≤ floor + {p50_slack} = {lim:.2f})"))
        out.append((r["added_p99_ms"] <= 1.5, f"{name}: added p99 {r['added_p99_ms']:.2f} ms (goal ≤ 1.5)"))
        out.append((r["rss_mib"] <= rss_cap, f"{name}: RSS {r['rss_mib']:.0f} MiB (goal ≤ {rss_cap:.0f})"))
        if lite is not None:
            out.append((r["rps"] >= 25 * lite["rps"], f"{name}: {r['rps'] / lite['rps']:.1f}× LiteLLM RPS (goal ≥ 25)"))
            out.append((r["added_p50_ms"] <= lite["added_p50_ms"] / 10,
                        f"{name}: added p50 {r['added_p50_ms']:.2f} ms vs LiteLLM "
                        f"{lite['added_p50_ms']:.2f} (goal ≤ 1/10)"))
    return out + scaling_goals(summary)


def scaling_goals(summary: dict[str, dict[str, float]]) -> list[tuple[bool, str]]:
    """With a --users or --keys list: CPU per request flat (within 10 %) across the variants."""
    out: list[tuple[bool, str]] = []
    for store in ("memory", "redis"):
        rows = {n: r for n, r in summary.items() if n.startswith(store + " ")}
        costs = [r["cpu_ms_per_req"] for r in rows.values() if not math.isnan(r["cpu_ms_per_req"])]
        if len(costs) < 2:
            continue
        spread = max(costs) / min(costs) - 1
        detail = ", ".join(f"{n.split(' ', 1)[1]}: {r['cpu_ms_per_req']:.3f}" for n, r in rows.items())
        out.append((spread <= 0.10, f"{store}: CPU ms/req {detail}; spread {spread * 100:.0f}% (goal ≤ 10%)"))
    return out


# --- main --------------------------------------------------------------------------------


def run_rounds(targets: list[Target], plan: Plan, stream_body: bytes, started: float,
               quiet: Quiet) -> None:
    for t in targets:
        quiet.only(t)
        warm_up(t, plan)
    for rnd in range(plan.rounds):
        # Rotate the order each round so no target always runs first (or right after a heavy one).
        order = targets[rnd % len(targets):] + targets[: rnd % len(targets)]
        for phase in plan.phases:
            for t in order:
                quiet.only(t)
                try:
                    measure(t, phase, plan, stream_body)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    t.failures.append(f"{phase}: {exc}")
        print(f"# round {rnd + 1}/{plan.rounds} done at {time.monotonic() - started:.0f} s", file=sys.stderr)
    quiet.release()
    for t in targets:
        t.rss_bytes = h.rss_bytes(t.pids())
        if t.proc is not None and not t.proc.alive():
            t.failures.append(f"process exited during the run:\n{t.proc.log_tail()}")


def report(args: argparse.Namespace, targets: list[Target], plan: Plan, problems: list[str]) -> int:
    summary = summarize(targets)
    print(table(summary, targets, plan))
    checks = goals(summary) if not args.smoke else []
    if checks:
        print()
        for ok, text in checks:
            print(f"- {'PASS' if ok else 'MISS'} {text}")
    problems = problems + [f"{t.name}: {f}" for t in targets for f in t.failures]
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "plan": asdict(plan),
            "summary": summary,
            "samples": {t.name: t.samples for t in targets},
            "problems": problems,
        }, indent=2, default=str))
    for p in problems:
        print(f"PROBLEM {p}", file=sys.stderr)
    if problems:
        return 1
    return 1 if args.strict and not all(ok for ok, _ in checks) else 0


def target_names(args: argparse.Namespace) -> list[str]:
    names = selected_targets(args.only)
    if args.workers > 1 and "memory" in names:
        # meterproxy refuses --workers with the memory store (each worker would count alone).
        names.remove("memory")
        print("# --workers > 1: skipping the memory target (needs one process)", file=sys.stderr)
    if "litellm" in names and not os.environ.get("LITELLM_BIN"):
        names.remove("litellm")
        print("# LITELLM_BIN not set: skipping the litellm target", file=sys.stderr)
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = target_names(args)
    pin = h.Pinning.choose(args.workers, enabled=not args.no_pin)
    if pin.load:
        # The orchestrator runs the stream client, so it belongs with the load side.
        os.sched_setaffinity(0, {int(c) for c in pin.load.split(",")})
    _, _, body, stream_body = api_paths(args.api)
    plan = Plan(args.duration, args.rounds, args.warmup, args.conns, 1, args.stream_conns, args.api,
                pin.load, SMOKE_PHASES if args.smoke else PHASES)
    workdir = Path(tempfile.mkdtemp(prefix="meterbench-"))
    procs = h.Procs(workdir)
    started = time.monotonic()
    quiet: Quiet | None = None
    try:
        procs.proxy_env.update(h.malloc_env(args.malloc))
        fake_port = h.free_port()
        h.start_fake(procs, pin, fake_port, ["--latency-ms", str(args.upstream_latency_ms),
                                             "--chunk-interval-ms", str(args.chunk_interval_ms),
                                             "--stream-tokens", str(args.stream_tokens)])
        targets, problems = start_targets(args, names, procs, pin, fake_port, body)
        print(f"# pinning: load side on cores {pin.load or 'any'}, proxy on {pin.proxy or 'any'}; "
              f"{args.rounds} round(s) × {args.duration} s per phase; malloc {args.malloc}; workdir {workdir}",
              file=sys.stderr)
        quiet = Quiet(targets, enabled=not args.no_pause)
        run_rounds(targets, plan, stream_body, started, quiet)
        code = report(args, targets, plan, problems)
        print(f"# total {time.monotonic() - started:.1f} s", file=sys.stderr)
        return code
    finally:
        if quiet is not None:
            quiet.release()
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
