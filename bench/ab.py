"""Compare meterproxy builds (or one build under different loads) side by side: CPU per request.

Each target is a meterproxy executable with an identity to load it with. All run at once, but only
the measured one is awake (the others are stopped), and short wrk phases alternate between them
so that the VM's minute-to-minute speed hits all alike. Reports each target's median CPU ms per
request and, against the first target, the median and quartiles of the per-round ratios (adjacent
phases share the machine's current speed, so the ratio is steadier than either number).

  # the last commit against this checkout, at 100,000 users
  git worktree add /tmp/old HEAD~1
  printf '#!/bin/sh\\ncd /tmp/old && exec %s/.venv/bin/python -m proxy "$@"\\n' "$PWD" > /tmp/old.sh
  chmod +x /tmp/old.sh
  .venv/bin/python bench/ab.py --warmup 60 old=/tmp/old.sh:u100000 new=.venv/bin/meterproxy:u100000
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import harness as h
from loadgen import Identity, wrk_script
from run import Plan, Quiet, Target, measure, warm_up


def parse_target(text: str) -> tuple[str, str, Identity]:
    """LABEL=EXE[:IDENTITY], IDENTITY uN (N end users through the trusted key) or kN (N keys)."""
    label, sep, rest = text.partition("=")
    exe, _, ident = rest.partition(":")
    if not sep or not label or not exe:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=EXE[:uN|:kN]")
    if not ident:
        return label, exe, Identity()
    kind, count = ident[0], ident[1:]
    if kind not in "uk" or not count.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: the identity is uN (users) or kN (keys)")
    n = int(count)
    return label, exe, Identity(users=n) if kind == "u" else Identity(keys=max(1, n))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("targets", nargs="+", type=parse_target, metavar="LABEL=EXE[:uN|:kN]",
                   help="a meterproxy executable and the identities to rotate over (default: one key)")
    p.add_argument("--store", choices=("memory", "redis"), default="memory",
                   help="quota store; redis starts one redis-server per target on the load core")
    p.add_argument("--rounds", type=int, default=8, help="alternated rounds (default 8)")
    p.add_argument("--duration", type=int, default=3, help="seconds per phase (default 3)")
    p.add_argument("--warmup", type=int, default=10,
                   help="seconds of load per target first; at least users / RPS to see every subject")
    p.add_argument("--conns", type=int, default=64, help="wrk connections (default 64)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pin = h.Pinning.choose(1)
    work = Path(tempfile.mkdtemp(prefix="meterab-"))
    procs = h.Procs(work)
    quiet: Quiet | None = None
    try:
        upstream = h.free_port()
        h.start_fake(procs, pin, upstream)
        targets: list[Target] = []
        for label, exe, ident in args.targets:
            store = "memory"
            if args.store == "redis":
                redis_port = h.free_port()
                h.start_redis(procs, pin, redis_port)
                store = f"redis://127.0.0.1:{redis_port}/0"
            cfg = h.meterproxy_config(work, label, upstream, store, ident.keys)
            port = h.free_port()
            proc = h.start_meterproxy(procs, pin, label, port, cfg, 1, exe=exe)
            script = wrk_script(work / f"{label}.lua", h.CHAT_BODY, ident)
            targets.append(Target(label, port, "/openai/v1/chat/completions", proc, ident, script))
        plan = Plan(args.duration, args.rounds, args.warmup, args.conns, 1, 1, "openai", pin.load, ("rps",))
        quiet = Quiet(targets, enabled=True)
        for t in targets:
            quiet.only(t)
            warm_up(t, plan)
        for rnd in range(args.rounds):
            for t in targets if rnd % 2 == 0 else targets[::-1]:
                quiet.only(t)
                measure(t, "rps", plan, b"")
                last = t.samples["rps"][-1]
                print(f"# round {rnd + 1}/{args.rounds} {t.name}: {last['cpu_ms_per_req']:.4f} ms/req, "
                      f"{last['rps']:.0f} RPS, {last['cpu_util'] * 100:.0f}% busy", file=sys.stderr)
        if any(t.failures for t in targets):
            print("\n".join(f"{t.name}: {f}" for t in targets for f in t.failures), file=sys.stderr)
            return 1
        cost = {t.name: [s["cpu_ms_per_req"] for s in t.samples["rps"]] for t in targets}
        first = targets[0].name
        for t in targets:
            line = f"{t.name}: median {statistics.median(cost[t.name]):.4f} ms CPU per request"
            if t.name != first:
                ratios = sorted(a / b for a, b in zip(cost[t.name], cost[first], strict=True))
                q = len(ratios) // 4
                line += (f"; against {first}: median ratio {statistics.median(ratios):.3f}, "
                         f"quartiles {ratios[q]:.3f}..{ratios[-1 - q]:.3f}")
            print(line)
        return 0
    finally:
        if quiet is not None:
            quiet.release()
        procs.stop_all()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
