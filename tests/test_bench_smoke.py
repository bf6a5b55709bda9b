"""The benchmark harness still runs end to end (its smoke mode: a few seconds, every target serves)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
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
    head = next(line for line in r.stdout.splitlines() if line.startswith("| target"))
    col = [c.strip() for c in head.split("|")].index("Redis CPU ms/req")
    cells = {t: rows[t].split("|")[col].strip() for t in ("memory", "redis")}
    assert cells["memory"] == "—" and float(cells["redis"]) > 0, head + "\n" + r.stdout  # its own redis-server's



def _stopped(pid: int, expected: bool = True) -> bool:
    """Whether a process is stopped (state T), given a moment for a signal to land: waits up to 2 s
    for the state to become the `expected` one."""
    deadline = time.monotonic() + 2
    while True:
        stopped = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
        if stopped == expected or time.monotonic() > deadline:
            return stopped
        time.sleep(0.01)


def test_only_the_measured_target_runs_and_all_run_again_after(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import harness as h
        from loadgen import Identity
        from run import Quiet, Target
    finally:
        sys.path.remove(str(ROOT / "bench"))
    procs = h.Procs(tmp_path)
    a, b = (Target(f"t{i}", 0, "/", procs.spawn(f"sleeper-{i}", ["sleep", "60"]), Identity(), tmp_path / "x.lua")
            for i in range(2))
    direct = Target("direct", 0, "/", None, Identity(), tmp_path / "x.lua")
    pid_a, pid_b = a.pids()[0], b.pids()[0]
    try:
        quiet = Quiet([direct, a, b], enabled=True, settle_s=0.0)
        quiet.only(a)
        assert _stopped(pid_b) and not _stopped(pid_a, False)
        quiet.only(b)  # b is resumed, a stopped
        assert _stopped(pid_a) and not _stopped(pid_b, False)
        quiet.only(direct)  # the baseline runs with every proxy stopped
        assert _stopped(pid_a) and _stopped(pid_b)
        quiet.release()
        assert not _stopped(pid_a, False) and not _stopped(pid_b, False)
    finally:
        procs.stop_all()


def test_ab_compares_two_targets_side_by_side() -> None:
    exe = str(Path(sys.executable).parent / "meterproxy")
    r = subprocess.run([sys.executable, "bench/ab.py", "--rounds", "2", "--duration", "1", "--warmup", "1",
                        f"one={exe}", f"users={exe}:u10"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("one: median ") and "ms CPU per request" in lines[0], r.stdout
    assert lines[1].startswith("users: median ") and "against one: median ratio " in lines[1], r.stdout
    assert r.stderr.count("# round ") == 4  # two rounds, each phase on both targets
    bad = subprocess.run([sys.executable, "bench/ab.py", f"one={exe}:x10"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "the identity is uN (users) or kN (keys)" in bad.stderr


def test_store_cost_measures_redis_cpu_per_request() -> None:
    r = subprocess.run([sys.executable, "bench/store_cost.py", "--subjects", "3,40", "--requests", "3000",
                        "--visits", "1", "--redis-core", "", "--client-core", ""],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [line.split("|") for line in r.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row[1].strip() for row in rows] == ["3", "40"], r.stdout
    # Redis CPU, the client's own CPU and the rate: each measured, so each positive
    assert all(float(row[2]) > 0 and float(row[3]) > 0 and float(row[4].replace(",", "")) > 0
               for row in rows), r.stdout
