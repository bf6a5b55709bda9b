"""The benchmark harness still runs end to end (its smoke mode: a few seconds, every target serves)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_serves_through_every_target() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LITELLM_BIN"}
    r = subprocess.run([sys.executable, "bench/run.py", "--smoke", "--only", "floor,memory,redis"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split("|")[1].strip(): line for line in r.stdout.splitlines() if line.startswith("| ")}
    for target in ("direct", "floor", "memory", "redis"):
        assert target in rows and rows[target].rstrip().endswith("| ok |"), r.stdout
