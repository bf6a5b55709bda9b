"""Route: which provider a request goes to, and the path it goes to there.

`/{provider}/...` names the provider; `/v1/...` picks it by the body's `model` through the
`models:` globs (else the default provider); `/v1beta/...` goes to the first Gemini provider.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from fnmatch import fnmatchcase

from .config import Config, Deployment
from .errors import BadRequest, NotFound
from .providers import Adapter


@dataclass(frozen=True, slots=True)
class Target:
    adapter: Adapter
    path: str  # path to send upstream, starting with "/"
    strip: int = 0  # characters of the raw request path before `path` (the "/{provider}" prefix)
    alternates: tuple[str, ...] = ()  # other deployments of the model, in the order to try them


class Router:
    def __init__(self, config: Config, adapters: dict[str, Adapter]) -> None:
        self._adapters = adapters
        self._globs: list[tuple[str, list[Deployment]]] = [
            (glob, [Deployment(provider=t)] if isinstance(t, str) else t) for glob, t in config.models.items()]
        self._default = config.default_provider
        self._gemini = next((a for a in adapters.values() if a.family == "gemini"), None)
        self._model_cache: dict[str, list[Deployment] | None] = {}

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
        deployments = self._deployments_for(model) if model else None
        if deployments is None:
            if self._default is None:
                if model is None:
                    raise BadRequest("The /v1 route picks a provider by the body's `model`, and none was given.")
                raise NotFound(f"No provider is configured for model {model!r} (see `models:` in the config).")
            return Target(self._adapters[self._default], path)
        order = _weighted_order(deployments)
        return Target(self._adapters[order[0]], path, 0, tuple(order[1:]))

    def _deployments_for(self, model: str) -> list[Deployment] | None:
        hit = self._model_cache.get(model, False)
        if hit is not False:
            return hit  # type: ignore[return-value]
        found = next((d for glob, d in self._globs if fnmatchcase(model, glob)), None)
        if len(self._model_cache) < 10_000:
            self._model_cache[model] = found  # type: ignore[assignment]
        return found


def _weighted_order(deployments: list[Deployment]) -> list[str]:
    """Providers in the order to try: a weighted draw first, then the rest by weight."""
    if len(deployments) == 1:
        return [deployments[0].provider]
    first = random.choices(deployments, weights=[d.weight for d in deployments])[0]
    rest = sorted((d for d in deployments if d is not first), key=lambda d: -d.weight)
    return [first.provider, *(d.provider for d in rest)]
