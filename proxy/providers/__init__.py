"""Provider adapters, one per provider kind; adding a provider is one file and one line here."""
from __future__ import annotations

from ..config import ProviderConfig
from .anthropic import AnthropicAdapter
from .azure import AzureAdapter
from .base import Adapter, Call, StreamTap
from .gemini import GeminiAdapter
from .openai import OpenAIAdapter

ADAPTERS: dict[str, type[Adapter]] = {
    "openai": OpenAIAdapter,
    "azure": AzureAdapter,
    "anthropic": AnthropicAdapter,
    "gemini": GeminiAdapter,
}


def build_adapter(name: str, config: ProviderConfig) -> Adapter:
    return ADAPTERS[config.type](name, config)


__all__ = ["Adapter", "Call", "StreamTap", "build_adapter", "ADAPTERS"]
