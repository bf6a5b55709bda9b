"""Cache misses per request for N subjects, counted (not timed) under valgrind's cachegrind.

What a request costs more with 100,000 subjects than with 10 is memory: each object of its
subject that it reaches is a cache miss, and on a VM the timing of that is too noisy to compare
builds by a few percent. cachegrind simulates the caches, so its counts are the same from run to
run of one build and hash seed. Where objects happen to lie still moves them: one checkout read
45.3 last-level misses per request at 5,000 subjects run from its sources and 36.4 from .pyc
files, so every checkout is compiled first, and `--seeds N` repeats each measurement with other
hash seeds (other dict orders, other placement) to show the spread.

It runs, in process and with no HTTP, the steps of a request that depend on its subject
(authenticate, admit, settle with the usage aggregates, metrics) on the memory store, with a
simulated clock at 5,000 requests/s (`--rate`) and the cyclic GC off once warm. Each subject is
first seen once; then one run measures `--requests` more requests and another none, and their
difference, divided by `--requests`, is what one request costs: instructions, first-level data misses,
last-level data misses. The last-level cache is set small (2 MiB) so that a few thousand
subjects already overflow it, as 100,000 overflow a real one.

Each checkout is a directory holding a `proxy` package: this one, or a `git worktree` of another
commit. Needs valgrind (Debian: apt-get install -y valgrind); ~6 minutes for two checkouts with the
defaults on two cores, ~12 with --keys, times --seeds.

  git worktree add /tmp/old HEAD~1
  .venv/bin/python bench/cache_misses.py old=/tmp/old new=.    # 10 and 5,000 end users each
  .venv/bin/python bench/cache_misses.py --keys new=.          # configured keys instead
"""
from __future__ import annotations

import argparse
import compileall
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
_FIELDS = {"instructions": "I   refs", "D1 misses": "D1  misses", "LLd misses": "LLd misses"}


def parse_target(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label or not (Path(path) / "proxy").is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=DIR, DIR holding a proxy package")
    return label, Path(path).resolve()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    p = argparse.ArgumentParser(description=doc.splitlines()[0], epilog=doc.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="+", type=parse_target, metavar="LABEL=DIR", help="checkouts to compare")
    p.add_argument("--subjects", default="10,5000", help="comma list of subject counts (default 10,5000)")
    p.add_argument("--keys", action="store_true",
                   help="subjects are configured keys (default: end users named through one trusted key)")
    p.add_argument("--requests", type=int, default=4000, help="requests measured (default 4000)")
    p.add_argument("--rate", type=float, default=5000.0,
                   help="simulated requests per second (default 5000); e.g. 200 with 5,000 subjects spaces "
                        "each subject's requests 25 s apart, as 100,000 users at 4,000 RPS are")
    p.add_argument("--seeds", type=int, default=1,
                   help="hash seeds to run each measurement with (default 1): the median is reported, "
                        "with the last-level misses' range; use 3 or more to compare changes of a few misses")
    p.add_argument("--ll-bytes", type=int, default=2 * 1024 * 1024, help="simulated last-level cache (default 2 MiB)")
    p.add_argument("--inner", nargs=3, metavar=("SUBJECTS", "WARM", "MEASURED"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def workload(subjects: int, warm: int, measured: int, keys: bool, rate: float) -> None:
    """The measured process: runs under cachegrind, with the checkout first on sys.path."""
    import time
    from zoneinfo import ZoneInfo

    # Simulated clocks: under cachegrind real time runs ~60x slower, and what depends on it (the
    # output history drops pairs idle for ten minutes of `time.monotonic`) would vary from run to
    # run. Set before the proxy is imported, which binds `time.monotonic` as a default.
    clock = [1_800_000_000.0]
    time.time = lambda: clock[0]
    time.monotonic = lambda: clock[0] - 1_700_000_000.0

    import harness
    from prometheus_client import CollectorRegistry

    from proxy.app import load_prices
    from proxy.auth import KeyRing
    from proxy.config import load_config
    from proxy.estimate import Estimate
    from proxy.metrics import Metrics
    from proxy.providers import build_adapter
    from proxy.quota.gate import Gate
    from proxy.quota.memory import MemoryStore
    from proxy.records import CountSource, TokenCounts, UsageRecord

    step = 1 / rate
    path = harness.meterproxy_config(Path(tempfile.mkdtemp()), "m", 9, "memory", subjects if keys else 1)
    config = load_config(str(path))
    tz = ZoneInfo(config.timezone)
    store = MemoryStore(tz=tz)
    metrics = Metrics(CollectorRegistry())
    gate = Gate(config, store, load_prices(config, str(path)), metrics, tz)
    ring = KeyRing(config, store)
    adapter = build_adapter("openai", config.providers["openai"])
    est = Estimate("gpt-4o-mini", 20, CountSource.TOKENIZER, 50, 50, 1, 100, True)
    names = [harness.key_name(i) for i in range(1, subjects + 1)] if keys else [f"user-{i}" for i in range(subjects)]
    tokens = TokenCounts(20, 0, 0, 10, 0)

    def one(i: int) -> None:
        clock[0] += step
        name = (names[i % subjects] + " ")[:-1]  # a fresh string, as a parsed header is
        subject = ring.configured_subject(name, None) if keys else ring.configured_subject(harness.TRUSTED_KEY, name)
        assert subject is not None
        rid = f"req-{i}"
        ticket = gate.admit_now(subject, adapter, est, rid)
        rec = UsageRecord(rid, rid, clock[0], subject.user, subject.team, subject.plan, subject.key_id, "openai",
                          est.model, "chat", tokens, CountSource.PROVIDER, CountSource.PROVIDER, 30, True, 200,
                          0.001, None, False, False)
        assert ticket is not None and gate.settle_now(ticket, rec)
        metrics.observe(rec, 0.0001)

    for i in range(warm):
        one(i)
    # Collections of the cyclic GC land in one run and not the other, and a full one walks every
    # subject's objects: a few of those would outweigh the requests' own misses. Both runs collect
    # here and none after (fewer objects per subject do also make the collector's passes cheaper,
    # but that is not what this counts).
    gc.collect()
    gc.disable()
    for i in range(warm, warm + measured):
        one(i)
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: its misses differ from run to run


def counts(target: Path, subjects: int, warm: int, measured: int, seed: int,
           args: argparse.Namespace) -> dict[str, int]:
    cmd = ["valgrind", "--tool=cachegrind", "--cache-sim=yes", "--cachegrind-out-file=/dev/null",
           "--I1=32768,8,64", "--D1=32768,8,64", f"--LL={args.ll_bytes},16,64",
           sys.executable, str(Path(__file__).resolve()), "--inner", str(subjects), str(warm), str(measured),
           *(["--keys"] if args.keys else []), "--rate", str(args.rate), "x=" + str(target)]
    env = {**os.environ, "PYTHONHASHSEED": str(seed), "PYTHONPATH": f"{target}{os.pathsep}{BENCH}"}
    out = subprocess.run(cmd, cwd=target, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"cache_misses: the run in {target} failed:\n{out.stderr[-2000:]}")
    found = {}
    for name, label in _FIELDS.items():
        m = re.search(re.escape(label) + r":\s+([\d,]+)", out.stderr)
        if m is None:
            raise SystemExit(f"cache_misses: no '{label}' in valgrind's output:\n{out.stderr[-2000:]}")
        found[name] = int(m.group(1).replace(",", ""))
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.inner:
        subjects, warm, measured = (int(x) for x in args.inner)
        workload(subjects, warm, measured, args.keys, args.rate)
        return 0
    if shutil.which("valgrind") is None:
        print("cache_misses: valgrind is not installed (Debian: apt-get install -y valgrind)", file=sys.stderr)
        return 2
    sizes = [int(x) for x in args.subjects.split(",")]
    for _, target in args.targets:
        # Bytecode compiled in memory (no .pyc) lies elsewhere in the heap than bytecode loaded from
        # files, which moves the counts: every checkout runs from .pyc files.
        compileall.compile_dir(str(target / "proxy"), quiet=1)
    seeds = range(max(1, args.seeds))
    jobs = [(label, target, n, measured, seed) for label, target in args.targets for n in sizes
            for seed in seeds for measured in (0, args.requests)]
    print(f"# {len(jobs)} cachegrind runs, {os.cpu_count()} at a time; LL {args.ll_bytes // 1024} KiB, "
          f"{args.requests} requests measured at {args.rate:g} simulated requests/s", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        # Every subject is seen once before the measured requests (and a little more: the process's
        # own state warms up in the first 2,000).
        results = list(pool.map(lambda j: counts(j[1], j[2], j[2] + 2000, j[3], j[4], args), jobs))
    by_job = dict(zip(((label, n, m, seed) for label, _, n, m, seed in jobs), results, strict=True))
    kind = "keys" if args.keys else "end users"
    print(f"| checkout | {kind} | instructions / req | D1 misses / req | LLd misses / req | LLd range ({len(seeds)} seeds) |")
    print("|---|---|---|---|---|---|")
    for label, _ in args.targets:
        for n in sizes:
            per = {k: [(by_job[(label, n, args.requests, s)][k] - by_job[(label, n, 0, s)][k]) / args.requests
                       for s in seeds] for k in _FIELDS}
            med = {k: statistics.median(v) for k, v in per.items()}
            lo, hi = min(per["LLd misses"]), max(per["LLd misses"])
            print(f"| {label} | {n:,} | {med['instructions']:,.0f} | {med['D1 misses']:,.1f} | "
                  f"{med['LLd misses']:,.1f} | {lo:,.1f}–{hi:,.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
