"""What-if replay: recorded usage events against a proposed config's limits, offline."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from conftest import ROOT, base_config, merge

from proxy.app import load_prices
from proxy.config import Config
from proxy.replay import replay_file

T0 = datetime(2030, 3, 17, 10, 0, tzinfo=UTC).timestamp()
PROPOSED = {
    "prices": {"test-model": {"input": 1.0, "output": 2.0}},  # 1 and 2 micro-dollars a token
    "plans": {"free": {}, "pro": {"priority": 5},
              "queued": {"rpm": 1, "on_limit": "queue", "max_queue_seconds": 120}},
    "users": {"alice": {"plan": "free", "team": "research", "rpm": 3},
              "bob": {"plan": "free", "usd_per_day": 0.008},
              "carol": {"plan": "free", "max_concurrent": 1},
              "dave": {"plan": "queued"}},
}


def event(n: int, user: str, at: float, *, team: str | None = None, latency: float = 0.5, inp: int = 1000,
          out: int = 1000, cost: int = 3000) -> dict[str, Any]:
    return {"event_id": f"e{n:03d}", "request_id": f"e{n:03d}", "time": T0 + at, "user": user, "team": team,
            "plan": "free", "key_id": "k", "provider": "openai", "model": "test-model", "api": "chat",
            "input_tokens": inp, "cached_input_tokens": 0, "cache_write_tokens": 0, "output_tokens": out,
            "reasoning_tokens": 0, "cost_micro_usd": cost, "status": 200, "latency_ms": latency * 1000,
            "streamed": False, "cut_short": False}


def recorded() -> list[dict[str, Any]]:
    evs = [event(i, "alice", i, team="research") for i in range(5)]  # 5 in one minute; rpm 3
    evs += [event(10 + i, "bob", 10 + i) for i in range(4)]  # $0.003 each; $0.008 a day
    evs += [event(20, "carol", 20, latency=5), event(21, "carol", 21), event(22, "carol", 30)]
    evs += [event(30, "dave", 100), event(31, "dave", 101)]
    return evs


def write_ledger(path: Path, events: list[dict[str, Any]]) -> Path:
    # Out of order on purpose (the ledger is written in finish order), plus one torn line.
    lines = [json.dumps(e) for e in reversed(events)] + ['{"event_id": "torn", "ti']
    path.write_text("\n".join(lines) + "\n")
    return path


def config(tmp_path: Path, extra: dict[str, Any]) -> Config:
    return Config.model_validate(merge(base_config("http://127.0.0.1:9", tmp_path), extra))


async def test_replay_counts_rejections_clamps_and_spend(tmp_path: Path) -> None:
    cfg = config(tmp_path, PROPOSED)
    ledger = write_ledger(tmp_path / "usage.jsonl", recorded())
    result = await replay_file(ledger, cfg, load_prices(cfg, str(tmp_path / "c.yaml")), UTC)
    assert result.events == 14 and result.unreadable == 1
    alice, bob, carol, dave = (result.users[u] for u in ("alice", "bob", "carol", "dave"))
    # rpm 3: the 4th and 5th request of the minute are refused
    assert (alice.requests, alice.admitted, alice.rejected) == (5, 3, 2) and alice.rejected_by == {"rpm": 2}
    assert alice.cost_micro_usd == 3 * 3000 and alice.recorded_cost_micro_usd == 5 * 3000
    # $0.008 a day: $0.003, $0.003, then $0.002 left: clamped to 500 output tokens ($0.001 prompt +
    # $0.001 output), then nothing left: refused
    assert (bob.admitted, bob.clamped, bob.rejected) == (3, 1, 1) and bob.rejected_by == {"usd_per_day": 1}
    assert bob.cost_micro_usd == 8000
    # max_concurrent 1: the second overlaps the first (5 s long) and is refused; the third comes after
    assert (carol.admitted, carol.rejected, carol.rejected_by) == (2, 1, {"max_concurrent": 1})
    # rpm 1 on a queueing plan: the second waits for the window (59 s, within 120 s) instead
    assert (dave.admitted, dave.delayed, dave.rejected) == (2, 1, 0)
    # teams: alice's team sums her requests
    research = result.teams["research"]
    assert (research.requests, research.rejected, research.cost_micro_usd) == (5, 2, 9000)
    assert set(result.teams) == {"research"}


async def test_replay_without_limits_changes_nothing(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"prices": PROPOSED["prices"]})
    ledger = write_ledger(tmp_path / "usage.jsonl", recorded())
    result = await replay_file(ledger, cfg, load_prices(cfg, str(tmp_path / "c.yaml")), UTC)
    for o in result.users.values():
        assert o.rejected == o.clamped == o.delayed == 0 and o.cost_micro_usd == o.recorded_cost_micro_usd


def test_replay_cli(tmp_path: Path) -> None:
    ledger = write_ledger(tmp_path / "usage.jsonl", recorded())
    cfg_path = tmp_path / "proposed.yaml"
    cfg_path.write_text(yaml.safe_dump(merge(base_config("http://127.0.0.1:9", tmp_path), PROPOSED)))
    run = subprocess.run([sys.executable, "-m", "proxy", "replay", "--ledger", str(ledger), "--config",
                          str(cfg_path), "--format", "json"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    rows = {(r["kind"], r["name"]): r for r in out["rows"]}
    assert out["events"] == 14 and out["unreadable_lines"] == 1
    assert rows[("user", "bob")] == {
        "kind": "user", "name": "bob", "requests": 4, "admitted": 3, "clamped": 1, "delayed": 0, "rejected": 1,
        "rejected_by": "usd_per_day=1", "spend_usd": "0.008", "recorded_usd": "0.012"}
    assert rows[("team", "research")]["rejected"] == 2
    table = subprocess.run([sys.executable, "-m", "proxy", "replay", "--ledger", str(ledger), "--config",
                            str(cfg_path)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert table.returncode == 0 and "rpm=2" in table.stdout and "14 events replayed" in table.stdout
