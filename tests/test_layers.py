"""The import layering STYLE.md asks for, kept true by walking every module's imports with ast.

value types → pure logic → I/O adapters → HTTP surface → composition; imports only go downward,
and only config.py reads the environment.
"""
from __future__ import annotations

import ast
from pathlib import Path

PROXY = Path(__file__).resolve().parents[1] / "proxy"

LAYERS: dict[str, int] = {
    # value types and errors
    "errors": 0, "records": 0, "quota.store": 0, "upstream_errors": 0,
    # pure logic: no I/O
    "config": 1, "tokens": 1, "prompt_tokens": 1, "image_size": 1, "upstream_wire": 1, "pricing": 1, "providers": 1, "providers.base": 1, "providers.sse": 1,
    "providers.openai": 1, "providers.azure": 1, "providers.anthropic": 1, "providers.gemini": 1,
    "route": 1, "estimate": 2, "settle": 2, "usage": 1, "quota.limits": 2, "quota.counters": 2, "quota.layout": 2, "quota.redis_direct": 2, "quota.clamp": 2, "quota.history": 2, "quota.sweep": 1, "auth": 2, "openapi": 1,
    # I/O adapters
    "quota.memory": 3, "quota.redis_store": 3, "quota.redis_py": 3, "quota.resp": 3, "quota.slots": 3, "quota.state": 3, "quota.store_link": 4, "quota.gate": 4, "replay": 4,
    "upstream": 3, "upstream_connection": 3, "forwarding": 3, "resilience": 4, "relay": 3, "metrics": 3, "ledger": 4, "services": 5,
    # HTTP surface
    "pipeline": 6, "admin": 6,
    # composition
    "app": 7, "cli": 8, "__main__": 9,
}
PURE_FORBIDDEN = ("aiohttp.web", "redis")  # a pure module must not reach for a server or a store


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in PROXY.rglob("*.py"):
        rel = path.relative_to(PROXY).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        if name in ("__init__", "quota"):
            continue
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def imported(name: str, tree: ast.Module) -> set[str]:
    """Our modules (by layer name) and the external modules that `name` imports, lazily or not."""
    package = name.rsplit(".", 1)[0] if "." in name else ""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join([*base, node.module] if node.module else base)
                for alias in node.names:
                    full = f"{target}.{alias.name}" if target else alias.name
                    out.add(full if full in LAYERS else target)
            elif node.module:
                mod = node.module.removeprefix("proxy.")
                out.add(mod)
                for alias in node.names:
                    out.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_every_module_has_a_layer() -> None:
    assert set(modules()) <= set(LAYERS), set(modules()) - set(LAYERS)


def test_imports_only_go_downward() -> None:
    bad = []
    for name, tree in modules().items():
        for dep in imported(name, tree):
            if dep in LAYERS and dep != name and LAYERS[dep] > LAYERS[name]:
                bad.append(f"{name} (layer {LAYERS[name]}) imports {dep} (layer {LAYERS[dep]})")
    assert not bad, "\n".join(bad)


def test_pure_modules_do_no_io() -> None:
    bad = []
    for name, tree in modules().items():
        if LAYERS[name] > 2:
            continue
        for dep in imported(name, tree):
            if dep.startswith(PURE_FORBIDDEN):
                bad.append(f"{name} imports {dep}")
    assert not bad, "\n".join(bad)


def test_only_config_reads_the_environment() -> None:
    allowed = {"config", "cli", "app"}  # cli: log defaults; app: multiprocess metrics dir
    bad = [name for name, tree in modules().items() if name not in allowed
           and any(isinstance(n, ast.Attribute) and n.attr == "environ" for n in ast.walk(tree))]
    assert not bad
