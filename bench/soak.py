"""Soak test (issue 7): mixed traffic at a fixed rate against meterproxy, with its RSS sampled.

Plain requests, streams and client hang-ups mid-stream, open loop at --rate per second for
--duration seconds. Exits 1 when RSS grows more than --max-growth after the warm-up, when the
proxy dies, or when more than --max-error-rate of the requests fail. Not part of CI.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import harness as h
from loadgen import usage_pattern

MIB = 1024 * 1024


@dataclass
class Tally:
    sent: dict[str, int] = field(default_factory=lambda: {"plain": 0, "stream": 0, "hangup": 0})
    ok: dict[str, int] = field(default_factory=lambda: {"plain": 0, "stream": 0, "hangup": 0})
    errors: list[str] = field(default_factory=list)
    skipped: int = 0  # not started because too many were still in flight (the proxy fell behind)

    def fail(self, msg: str) -> None:
        self.errors.append(msg)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=600, help="seconds of traffic (default 600)")
    p.add_argument("--warmup", type=float, default=60, help="seconds before the RSS baseline (default 60)")
    p.add_argument("--rate", type=float, default=50, help="requests started per second (default 50)")
    p.add_argument("--sample-every", type=float, default=5, help="RSS sampling period in seconds")
    p.add_argument("--mix", default="plain=0.6,stream=0.3,hangup=0.1",
                   help="traffic shares: plain, stream, hangup (client closes after the first chunk)")
    p.add_argument("--users", type=int, default=200,
                   help="distinct end users named through the trusted key (all seen during warm-up)")
    p.add_argument("--store", choices=("memory", "redis"), default="memory")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--chunk-interval-ms", type=float, default=5.0,
                   help="upstream pause between stream events, so hang-ups land mid-stream")
    p.add_argument("--max-growth", type=float, default=0.10, help="allowed RSS growth after warm-up")
    p.add_argument("--max-error-rate", type=float, default=0.001)
    p.add_argument("--max-in-flight", type=int, default=500)
    p.add_argument("--keep", action="store_true", help="keep the temp dir (config, logs, ledger)")
    return p.parse_args(argv)


def parse_mix(text: str) -> tuple[list[str], list[float]]:
    kinds, weights = [], []
    for part in text.split(","):
        name, _, share = part.partition("=")
        if name.strip() not in ("plain", "stream", "hangup"):
            sys.exit(f"unknown traffic kind in --mix: {name!r}")
        kinds.append(name.strip())
        weights.append(float(share))
    return kinds, weights


async def one_request(session: aiohttp.ClientSession, url: str, kind: str, user: str, tally: Tally) -> None:
    body = h.CHAT_BODY if kind == "plain" else h.CHAT_STREAM_BODY
    headers = {"authorization": f"Bearer {h.TRUSTED_KEY}", "x-meterproxy-user": user,
               "content-type": "application/json"}
    tally.sent[kind] += 1
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                tally.fail(f"{kind}: HTTP {resp.status}: {(await resp.read())[:200]!r}")
                return
            if kind == "hangup":
                await resp.content.readany()
                resp.close()  # drops the connection mid-stream, like a client that went away
                tally.ok[kind] += 1
                return
            data = await resp.read()
            if kind == "stream" and not usage_pattern("openai").search(data):
                tally.fail(f"stream without usage: {data[-200:]!r}")
                return
            tally.ok[kind] += 1
    except (TimeoutError, aiohttp.ClientError) as exc:
        tally.fail(f"{kind}: {exc!r}")


async def drive(args: argparse.Namespace, port: int, proc: h.Proc) -> tuple[Tally, list[tuple[float, int]]]:
    kinds, weights = parse_mix(args.mix)
    rng = random.Random(7)
    url = f"http://127.0.0.1:{port}/openai/v1/chat/completions"
    tally = Tally()
    samples: list[tuple[float, int]] = []
    in_flight: set[asyncio.Task[None]] = set()
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.monotonic()
        next_sample = start
        n = 0
        while True:
            now = time.monotonic()
            elapsed = now - start
            if elapsed >= args.duration:
                break
            if now >= next_sample:
                rss = h.rss_bytes(h.process_tree(proc.pid))
                samples.append((elapsed, rss))
                print(f"t={elapsed:6.0f}s rss={rss / MIB:7.1f} MiB in_flight={len(in_flight)} "
                      f"errors={len(tally.errors)}", flush=True)
                next_sample += args.sample_every
                if not proc.alive():
                    tally.fail(f"meterproxy exited:\n{proc.log_tail()}")
                    break
            # Open loop: request n starts at n / rate whatever happened to the earlier ones.
            due = start + n / args.rate
            if due > now:
                await asyncio.sleep(min(due - now, max(0.0, next_sample - now)))
                continue
            n += 1
            if len(in_flight) >= args.max_in_flight:
                tally.skipped += 1
                continue
            kind = rng.choices(kinds, weights)[0]
            task = asyncio.ensure_future(one_request(session, url, kind, f"soak-{n % args.users}", tally))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        if in_flight:
            await asyncio.wait(in_flight, timeout=30)
    samples.append((time.monotonic() - start, h.rss_bytes(h.process_tree(proc.pid))))
    return tally, samples


def verdict(args: argparse.Namespace, tally: Tally, samples: list[tuple[float, int]]) -> list[str]:
    problems: list[str] = []
    after = [rss for t, rss in samples if t >= args.warmup]
    if len(after) < 4:
        problems.append("too few RSS samples after warm-up; run longer or sample more often")
    else:
        baseline = statistics.median(after[:3])
        final = statistics.median(after[-3:])
        growth = final / baseline - 1
        print(f"RSS after warm-up {baseline / MIB:.1f} MiB, at the end {final / MIB:.1f} MiB, "
              f"growth {growth * 100:+.1f}% (limit {args.max_growth * 100:.0f}%); "
              f"peak {max(after) / MIB:.1f} MiB")
        if growth > args.max_growth:
            problems.append(f"RSS grew {growth * 100:.1f}% after warm-up")
    total = sum(tally.sent.values())
    print(f"requests: sent {tally.sent}, ok {tally.ok}, errors {len(tally.errors)}, "
          f"skipped (too many in flight) {tally.skipped}")
    if total == 0:
        problems.append("no requests were sent")
    elif (len(tally.errors) + tally.skipped) / total > args.max_error_rate:
        problems.append(f"{len(tally.errors)} errors and {tally.skipped} skipped of {total}; "
                        f"first: {tally.errors[:3]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="metersoak-"))
    procs = h.Procs(workdir)
    pin = h.Pinning(None, None)
    try:
        fake_port, port = h.free_port(), h.free_port()
        h.start_fake(procs, pin, fake_port, ["--chunk-interval-ms", str(args.chunk_interval_ms)])
        store = "memory"
        if args.store == "redis":
            rport = h.free_port()
            h.start_redis(procs, pin, rport)
            store = f"redis://127.0.0.1:{rport}/0"
        cfg = h.meterproxy_config(workdir, "soak", fake_port, store, keys=1)
        proc = h.start_meterproxy(procs, pin, "meterproxy", port, cfg, args.workers)
        print(f"# soak: {args.duration:.0f} s at {args.rate:g}/s, mix {args.mix}, store {args.store}, "
              f"workdir {workdir}", flush=True)
        runner = asyncio.run
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            pass
        tally, samples = runner(drive(args, port, proc))
        problems = verdict(args, tally, samples)
        for p in problems:
            print(f"FAIL {p}")
        print("PASS" if not problems else "FAILED")
        return 1 if problems else 0
    except h.StartError as exc:
        print(f"FAIL {exc}")
        return 1
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
