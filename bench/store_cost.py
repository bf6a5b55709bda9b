"""Redis's own CPU per request for the redis store: admit + settle, as the proxy sends them.

Runs a throwaway redis-server on its own core and drives it from this process on another, with the
store's own client (the commands the proxy sends, pipelined over its connection), then reads the
server's CPU time from /proc. No proxy, upstream or HTTP: only what Redis spends, which on the
benchmark's two cores is taken from the load side (the `Redis CPU ms/req` column of run.py).

    .venv/bin/python bench/store_cost.py                          # 10 and 100,000 subjects
    .venv/bin/python bench/store_cost.py --subjects 10 --requests 200000
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness as h  # noqa: E402

from proxy.errors import StoreError  # noqa: E402
from proxy.quota.redis_store import RedisStore  # noqa: E402
from proxy.quota.store import Admission, AggregateDelta, Limit, LimitName, Totals  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subjects", default="10,100000",
                   help="comma list of distinct subjects (users), each measured with a fresh redis-server")
    p.add_argument("--requests", type=int, default=100_000, help="measured requests per subject count")
    p.add_argument("--visits", type=int, default=3,
                   help="unmeasured warm-up: every subject admitted and settled this many times first")
    p.add_argument("--gap", type=float, default=0.0,
                   help="seconds of simulated time between a subject's visits (0: the real clock). "
                        "At 60 or more every visit finds its subject's windows stale, as sparse "
                        "traffic does (a user seen every few minutes); Redis's key TTLs still run on "
                        "its own clock, so the stale buckets are there to drop")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    p.add_argument("--redis-core", default="1", help="taskset core list for redis-server ('' for none)")
    p.add_argument("--client-core", default="0", help="taskset core list for this process ('' for none)")
    return p.parse_args(argv)


class Subjects:
    """Per subject, what the gate hands the store: one limits tuple (the store keys layouts by it)."""

    def __init__(self, n: int) -> None:
        self.names = [f"user-{i}" for i in range(n)]
        self.limits = {s: (Limit(f"user:{s}", LimitName.RPM, 100_000_000),
                           Limit(f"user:{s}", LimitName.TPM, 1_000_000_000_000)) for s in self.names}


async def drive(store: RedisStore, subjects: Subjects, count: int, concurrency: int, start: int,
                gap: float = 0.0) -> None:
    """`count` requests, round robin over the subjects, `concurrency` at a time. With `gap`, the
    proxy's clock is simulated: each pass over the subjects comes `gap` seconds after the last."""
    day, month = time.strftime("%Y-%m-%d", time.gmtime()), time.strftime("%Y-%m", time.gmtime())
    totals = Totals(1, 12, 20, 0, 0, 0, 230)
    names, n = subjects.names, len(subjects.names)
    next_i = start
    t0 = time.time()

    async def worker() -> None:
        nonlocal next_i
        while next_i < start + count:
            i = next_i
            next_i += 1
            user = names[i % n]
            now = t0 + (i // n) * gap + (time.time() - t0) % 1 if gap else time.time()
            adm = Admission(f"r{i}", user, subjects.limits[user], 52, 600, now, day, month)
            decision = await store.admit(adm)
            assert decision.admitted and decision.reservation is not None
            usage = AggregateDelta(f"e{i}", user, day, user, None, "gpt-4o-mini", totals)
            await store.settle_and_record(decision.reservation, usage, now if gap else time.time())

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure(n: int, args: argparse.Namespace, procs: h.Procs) -> tuple[float, float, float]:
    """Redis CPU ms per request, this process's CPU ms per request (the store's client side, as in
    the proxy, plus this driver) and requests/s for `n` subjects, on a fresh redis-server."""
    port = h.free_port()
    server = h.start_redis(procs, h.Pinning(args.redis_core or None, None), port)
    try:
        store = RedisStore(f"redis://127.0.0.1:{port}/0")
        await store.start()
        subjects = Subjects(n)
        print(f"# {n} subjects: warming up ({args.visits} visits each)", file=sys.stderr, flush=True)
        await drive(store, subjects, n * args.visits, args.concurrency, 0, args.gap)
        cpu0, own0, t0 = h.cpu_seconds([server.pid]), time.process_time(), time.perf_counter()
        await drive(store, subjects, args.requests, args.concurrency, n * args.visits, args.gap)
        cpu, wall = h.cpu_seconds([server.pid]) - cpu0, time.perf_counter() - t0
        own = time.process_time() - own0
        await store.close()
        return cpu * 1000 / args.requests, own * 1000 / args.requests, args.requests / wall
    finally:
        server.stop()


async def amain(args: argparse.Namespace) -> int:
    print("| subjects | Redis CPU ms/req | client CPU ms/req | req/s |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="store-cost-") as tmp:
        procs = h.Procs(Path(tmp))
        try:
            for n in (int(x) for x in args.subjects.split(",")):
                try:
                    ms, own, rate = await measure(n, args, procs)
                except StoreError as exc:  # a stalled VM or redis-server: say so, not a traceback
                    print(f"store_cost: the {n:,}-subject run failed: {exc}. Nothing was measured for "
                          "it; run again (a busy machine can stall Redis past the store's timeout).",
                          file=sys.stderr)
                    return 1
                print(f"| {n:,} | {ms:.4f} | {own:.4f} | {rate:,.0f} |", flush=True)
        finally:
            procs.stop_all()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client_core:
        os.sched_setaffinity(0, {int(c) for c in args.client_core.split(",")})
    try:
        import uvloop
    except ImportError:
        return asyncio.run(amain(args))
    return uvloop.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
