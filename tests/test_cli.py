"""The command line: check-config's one-line errors, tokens, and --help."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_check_config_example_ok() -> None:
    r = run("check-config", "--config", "config/example.yaml")
    assert r.returncode == 0, r.stderr
    assert "provider openai" in r.stdout and "plans: free, pro" in r.stdout


def test_check_config_broken_field_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers:\n  openai:\n    type: openai\n    base_url: not-a-url\n")
    r = run("check-config", "--config", str(bad))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert str(bad) in lines[0] and "providers.openai.base_url" in lines[0] and ":4:" in lines[0]
    assert "Traceback" not in r.stderr


def test_check_config_unknown_field_and_bad_yaml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers:\n  openai: {type: openai, base_url: 'http://x'}\nplans:\n  free: {rpm: -1}\n")
    r = run("check-config", "--config", str(bad))
    assert r.returncode == 1 and "plans.free.rpm" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad.write_text("providers:\n  openai: {type: openai, base_url: 'http://x'}\nplans:\n  free: {tpm: 9007199254740993}\n")
    r = run("check-config", "--config", str(bad))  # above MAX_LIMIT (2**53): the stores' counters could not hold it
    assert r.returncode == 1 and "plans.free.tpm" in r.stderr and "9007199254740992" in r.stderr
    bad.write_text("providers: [\n")
    r = run("check-config", "--config", str(bad))
    assert r.returncode == 1 and "not valid YAML" in r.stderr and "Traceback" not in r.stderr


def test_check_config_store_urls(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    for store, ok in (("unix:///run/redis.sock?db=2", True), ("redis://h:6379/0", True), ("unix://", False),
                      ("unix://?db=2", False), ("valkey://h:1/0", False)):
        cfg.write_text(f"store: '{store}'\nproviders:\n  openai: {{type: openai, base_url: 'http://x'}}\n")
        r = run("check-config", "--config", str(cfg))
        assert (r.returncode == 0) is ok, (store, r.stderr)
        if not ok:
            assert "store" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_check_config_missing_env(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers:\n  openai: {type: openai, base_url: 'http://x', api_key: '${NO_SUCH_VAR_XYZ}'}\n")
    r = run("check-config", "--config", str(bad))
    assert r.returncode == 1 and "NO_SUCH_VAR_XYZ" in r.stderr and "providers.openai.api_key" in r.stderr


def test_tokens_counts_stdin() -> None:
    r = run("tokens", "--model", "gpt-4o", stdin="Hello world")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("2 tokens (o200k_base)")


def test_help_explains() -> None:
    r = run("serve", "--help")
    assert r.returncode == 0 and "--workers" in r.stdout and "SIGHUP" in r.stdout


def test_workers_refused_on_memory_store() -> None:
    r = run("serve", "--config", "config/example.yaml", "--workers", "2")
    assert r.returncode == 1 and "redis" in r.stderr
