"""Azure OpenAI: deployment paths with `api-version`, the `api-key` header, deployment → model.

Bodies, usage and streams are OpenAI's (a first chunk may have empty choices and no usage).
"""
from __future__ import annotations

import re

from multidict import CIMultiDict, MultiMapping

from ..records import ApiKind
from .base import Call
from .openai import _KIND_SUFFIX, OpenAIAdapter, openai_kind

_DEPLOYMENT = re.compile(r"^/openai/deployments/([^/]+)/")


class AzureAdapter(OpenAIAdapter):
    def classify(self, method: str, path: str, query: MultiMapping[str]) -> tuple[ApiKind, str | None, bool]:
        m = _DEPLOYMENT.match(path)
        return openai_kind(method, path), (m.group(1) if m else None), False

    def pricing_model(self, model: str | None) -> str:
        if model is None:
            return "unknown"
        return self.config.deployments.get(model, model)

    def native_path(self, call: Call, model: str | None) -> str | None:
        suffix = _KIND_SUFFIX.get(call.kind)
        if suffix is None or model is None:
            return None
        deployment = next((d for d, m in self.config.deployments.items() if m == model), model)
        return f"/openai/deployments/{deployment}{suffix}"

    def upstream_query(self, query: MultiMapping[str]) -> list[tuple[str, str]]:
        items = super().upstream_query(query)
        if self.config.api_version and not any(k == "api-version" for k, _ in items):
            items.append(("api-version", self.config.api_version))
        return items

    def set_auth(self, headers: CIMultiDict[str]) -> None:
        if self.config.api_key:
            headers["api-key"] = self.config.api_key
