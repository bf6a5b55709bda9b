"""Route: which provider a request goes to, and the path it goes to there.

`/{provider}/...` names the provider; `/v1/...` picks it by the body's `model` through the
`models:` globs (else the default provider); `/v1beta/...` goes to the first Gemini provider.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from .config import Config
from .errors import BadRequest, NotFound
from .providers import Adapter


@dataclass(frozen=True, slots=True)
class Target:
    adapter: Adapter
    path: str  # path to send upstream, starting with "/"
    strip: int = 0  # characters of the raw request path before `path` (the "/{provider}" prefix)


class Router:
    def __init__(self, config: Config, adapters: dict[str, Adapter]) -> None:
        self._adapters = adapters
        self._globs = list(config.models.items())
        self._default = config.default_provider
        self._gemini = next((a for a in adapters.values() if a.family == "gemini"), None)
        self._model_cache: dict[str, str | None] = {}

    def by_path(self, path: str) -> Target | None:
        """The target when the path alone decides it, else None (the unified /v1 route)."""
        if "/../" in path + "/" or "/./" in path + "/" or "\\" in path:
            raise NotFound("Paths with dot segments are not forwarded.")
        if path.startswith("/v1/") or path == "/v1":
            return None
        if path.startswith("/v1beta/") and self._gemini is not None:
            return Target(self._gemini, path)
        name, sep, rest = path[1:].partition("/")
        adapter = self._adapters.get(name)
        if adapter is None:
            raise NotFound(f"No route for {path!r}: use /{{provider}}/... with one of "
                           f"{sorted(self._adapters)}, or /v1/... routed by model.")
        return Target(adapter, "/" + rest if sep else "/", 1 + len(name))

    def by_model(self, path: str, model: str | None) -> Target:
        name = self._provider_for(model) if model else self._default
        if name is None:
            if model is None:
                raise BadRequest("The /v1 route picks a provider by the body's `model`, and none was given.")
            raise NotFound(f"No provider is configured for model {model!r} (see `models:` in the config).")
        return Target(self._adapters[name], path)

    def _provider_for(self, model: str) -> str | None:
        hit = self._model_cache.get(model, "")
        if hit != "":
            return hit
        found = next((p for glob, p in self._globs if fnmatchcase(model, glob)), self._default)
        if len(self._model_cache) < 10_000:
            self._model_cache[model] = found
        return found
