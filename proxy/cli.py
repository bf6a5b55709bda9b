"""The `meterproxy` command: serve, check-config, tokens (and the store-reading commands)."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .config import Config, load_config
from .errors import ConfigError

log = logging.getLogger("meterproxy")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # no per-request INFO on the hot path


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"meterproxy: config error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    from .app import load_prices

    try:
        prices = load_prices(config, args.config)
    except ConfigError as e:
        print(f"meterproxy: config error: {e}", file=sys.stderr)
        return 1
    print(f"{args.config}: OK")
    print(f"  listen: {config.listen.host}:{config.listen.port}")
    print(f"  store: {config.store} (on_store_failure: {config.on_store_failure})")
    for name, p in config.providers.items():
        print(f"  provider {name}: {p.type} -> {p.base_url} (key {'set' if p.api_key else 'NOT set'})")
    for glob, provider in config.models.items():
        print(f"  model {glob} -> {provider}")
    print(f"  plans: {', '.join(config.plans)} (default: {config.default_plan})")
    print(f"  teams: {len(config.teams)}, users: {len(config.users)}, keys: {len(config.keys)}")
    print(f"  prices: {len(prices.keys())} entries (taken {prices.taken or 'unknown'})")
    print(f"  admin API: {'on' if config.admin_key else 'off (no admin_key)'}")
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from .tokens import Tokenizer

    tok = Tokenizer()
    tok.load()
    text = sys.stdin.read()
    n = tok.count_text(args.model, text)
    note = " (estimated from bytes: tiktoken encodings unavailable)" if tok.fallback else ""
    print(f"{n} tokens ({tok.encoding_name(args.model)}){note}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    config = _load(args.config)
    host = args.host or config.listen.host
    port = args.port if args.port is not None else config.listen.port
    if args.workers > 1:
        if config.store == "memory":
            print("meterproxy: --workers above 1 needs the redis store: with `store: memory` each worker "
                  "would keep its own counters and every limit would silently multiply.", file=sys.stderr)
            return 1
        return _serve_workers(args, host, port)
    _run_server(config, args.config, host, port, reuse_port=args.reuse_port)
    return 0


def _run_server(config: Config, config_path: str, host: str, port: int, reuse_port: bool = False) -> None:
    from aiohttp import web

    from .app import RELOAD, create_app

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    app = create_app(config, config_path)

    async def on_startup(app: web.Application) -> None:
        loop = asyncio.get_running_loop()
        # SIGHUP reloads the config; a bad file is logged and the running config kept.
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(app[RELOAD]()))
        log.info("listening on http://%s:%d (pid %d)", host, port, os.getpid())

    app.on_startup.append(on_startup)
    web.run_app(app, host=host, port=port, reuse_port=reuse_port or None, access_log=None,
                shutdown_timeout=config.drain_timeout, print=lambda *_: None,
                handle_signals=True)


def _serve_workers(args: argparse.Namespace, host: str, port: int) -> int:
    """N processes on one port (SO_REUSEPORT); metrics merged through a multiprocess directory."""
    mp_dir = tempfile.mkdtemp(prefix="meterproxy-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": mp_dir}
    cmd = [sys.executable, "-m", "proxy", "--log-level", args.log_level, "--log-format", args.log_format,
           "serve", "--config", args.config, "--host", host, "--port", str(port), "--reuse-port"]
    children = [subprocess.Popen(cmd, env=env) for _ in range(args.workers)]
    log.info("started %d workers on %s:%d", len(children), host, port)

    def forward(signum: int, _frame: object) -> None:
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    code = 0
    while children:
        for c in list(children):
            rc = c.poll()
            if rc is not None:
                children.remove(c)
                code = code or rc
        time.sleep(0.2)
    for f in Path(mp_dir).glob("*.db"):
        f.unlink()
    Path(mp_dir).rmdir()
    return code


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="meterproxy",
        description="A metering reverse proxy for LLM APIs: forwards calls with the provider's real key, "
                    "counts and prices tokens, enforces quotas, exports Prometheus metrics.",
    )
    p.add_argument("--log-level", default=os.environ.get("METERPROXY_LOG_LEVEL", "info"),
                   help="debug, info, warning or error (default: info)")
    p.add_argument("--log-format", choices=("text", "json"), default=os.environ.get("METERPROXY_LOG_FORMAT", "text"),
                   help="text, or json for one JSON object per line")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="run the proxy", description="Run the proxy. Ctrl-C or SIGTERM drains "
                       "in-flight requests and flushes usage before exiting; SIGHUP reloads the config.")
    s.add_argument("--config", required=True, help="the YAML config file (see config/example.yaml)")
    s.add_argument("--host", help="address to listen on (default: listen.host from the config)")
    s.add_argument("--port", type=int, help="port to listen on (default: listen.port from the config)")
    s.add_argument("--workers", type=int, default=1, help="processes sharing the port (needs the redis store)")
    s.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_serve)

    c = sub.add_parser("check-config", help="validate a config file and print what it understood")
    c.add_argument("--config", required=True, help="the YAML config file")
    c.set_defaults(func=cmd_check_config)

    t = sub.add_parser("tokens", help="count the tokens of standard input for a model")
    t.add_argument("--model", required=True, help="model name, e.g. gpt-4o (picks the encoding)")
    t.set_defaults(func=cmd_tokens)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
