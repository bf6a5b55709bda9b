"""The YAML config: schema (pydantic v2), `${VAR}` substitution and errors that name file, line and field.

This is the only module that reads the environment.
"""
from __future__ import annotations

import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
PROVIDER_TYPES = ("openai", "azure", "anthropic", "gemini")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def usd_to_micro(value: float | int | str | Decimal) -> int:
    """Dollars from the config to integer micro-dollars, exactly (no float arithmetic)."""
    micro = Decimal(str(value)) * 1_000_000
    if micro != micro.to_integral_value():
        raise ValueError(f"{value} has more precision than a micro-dollar")
    return int(micro)


class Listen(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)


class Timeouts(_Model):
    connect: float = Field(10.0, gt=0, description="seconds to open an upstream connection")
    read: float = Field(600.0, gt=0, description="seconds for a whole non-streamed response")
    idle: float = Field(120.0, gt=0, description="seconds a stream may go silent")


class Retries(_Model):
    """Retries happen only before anything was sent to the client."""

    attempts: int = Field(2, ge=0, le=10, description="extra attempts after the first")
    backoff: float = Field(0.2, ge=0, description="first backoff in seconds; doubles, with jitter")
    deadline: float = Field(30.0, gt=0, description="no new attempt after this many seconds")
    on_status: list[int] = Field(default_factory=lambda: [429, 500, 502, 503, 504, 529])


class CircuitBreaker(_Model):
    failures: int = Field(5, ge=1, description="consecutive failures that open the circuit")
    reset: float = Field(30.0, gt=0, description="seconds open before one trial request")


class ProviderConfig(_Model):
    type: Literal["openai", "azure", "anthropic", "gemini"]
    base_url: str
    api_key: str = ""
    # Azure: api-version to add when the client sent none; deployment name -> model for pricing.
    api_version: str | None = None
    deployments: dict[str, str] = Field(default_factory=dict)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    max_concurrent: int | None = Field(None, ge=1)
    retries: Retries = Field(default_factory=Retries)
    circuit_breaker: CircuitBreaker = Field(default_factory=CircuitBreaker)
    # Providers (of the same API family) to try next when this one fails before the first byte.
    fallbacks: list[str] = Field(default_factory=list)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")


class Deployment(_Model):
    """One of several providers serving a model, picked by weight."""

    provider: str
    weight: float = Field(1.0, gt=0)


# The largest limit (9.0e15; dollar limits: the same in micro-dollars, about $9 billion): the Redis
# store's scripts read numbers as Lua doubles, exact up to here, and a limit this large is no limit
# (leave it out instead). The gate reserves at most one more than this, so a request asking for
# more is refused by every enforced limit as before, and a shadow limit's counter cannot overflow.
MAX_LIMIT = 2**53
MAX_USD_LIMIT = Decimal(MAX_LIMIT) / 1_000_000


class Limits(_Model):
    """Limits shared by plans, teams, users and keys. Dollars here; micro-dollars in `budgets()`."""

    rpm: int | None = Field(None, ge=0, le=MAX_LIMIT)
    tpm: int | None = Field(None, ge=0, le=MAX_LIMIT)
    tokens_per_day: int | None = Field(None, ge=0, le=MAX_LIMIT)
    usd_per_day: Decimal | None = Field(None, ge=0, le=MAX_USD_LIMIT)
    usd_per_month: Decimal | None = Field(None, ge=0, le=MAX_USD_LIMIT)
    max_concurrent: int | None = Field(None, ge=0, le=MAX_LIMIT)
    enforce: bool = True  # false: shadow mode, count and log what would be refused

    @field_validator("usd_per_day", "usd_per_month", mode="before")
    @classmethod
    def _money(cls, v: Any) -> Any:
        if v is None:
            return v
        usd_to_micro(v)  # precision check
        return Decimal(str(v))

    def values(self) -> dict[str, int]:
        """Set limits as integers in the store's units (usd_* in micro-dollars)."""
        out: dict[str, int] = {}
        for name in ("rpm", "tpm", "tokens_per_day", "max_concurrent"):
            v = getattr(self, name)
            if v is not None:
                out[name] = v
        for name in ("usd_per_day", "usd_per_month"):
            v = getattr(self, name)
            if v is not None:
                out[name] = usd_to_micro(v)
        return out


class PlanConfig(Limits):
    priority: int = 1
    on_limit: Literal["reject", "queue"] = "reject"
    max_queue_seconds: float = Field(10.0, ge=0)
    on_limit_clamp: bool = True  # lower max_tokens to what a budget still affords


class TeamConfig(Limits):
    pass


class UserConfig(Limits):
    plan: str | None = None
    team: str | None = None


class KeyConfig(Limits):
    key: str | None = None
    key_sha256: str | None = None
    user: str
    plan: str | None = None
    team: str | None = None
    trusted_user_header: bool = False

    @model_validator(mode="after")
    def _one_key(self) -> KeyConfig:
        if bool(self.key) == bool(self.key_sha256):
            raise ValueError("give exactly one of `key` or `key_sha256`")
        if self.key_sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.key_sha256):
            raise ValueError("key_sha256 must be 64 lowercase hex digits")
        return self


class LedgerConfig(_Model):
    path: str | None = "data/usage.jsonl"
    fsync_interval: float = Field(1.0, ge=0)
    rotate_bytes: int = Field(100 * 1024 * 1024, ge=1024)
    queue_size: int = Field(100_000, ge=1)
    redis_stream: bool = True  # with the redis store, also XADD to a capped stream
    stream_maxlen: int = Field(1_000_000, ge=1)


class MetricsConfig(_Model):
    max_user_labels: int = Field(1000, ge=1)
    max_team_labels: int = Field(1000, ge=1)


class TokenizerConfig(_Model):
    default_encoding: str = "o200k_base"
    encodings: dict[str, str] = Field(default_factory=dict)  # model glob -> encoding


class Config(_Model):
    listen: Listen = Field(default_factory=Listen)
    store: str = "memory"
    on_store_failure: Literal["open", "closed"] = "open"
    store_timeout: float = Field(0.5, gt=0)
    admin_key: str | None = None
    providers: dict[str, ProviderConfig]
    # model glob -> provider, or weighted deployments: [{provider: openai, weight: 3}, {provider: azure}]
    models: dict[str, str | list[Deployment]] = Field(default_factory=dict)
    default_provider: str | None = None
    pricing_file: str | None = "config/pricing.yaml"
    prices: dict[str, Any] = Field(default_factory=dict)
    on_unpriced: Literal["zero", "reject"] = "zero"
    default_plan: str = "default"
    timezone: str = "UTC"
    plans: dict[str, PlanConfig] = Field(default_factory=lambda: {"default": PlanConfig()})
    teams: dict[str, TeamConfig] = Field(default_factory=dict)
    users: dict[str, UserConfig] = Field(default_factory=dict)
    keys: list[KeyConfig] = Field(default_factory=list)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    drain_timeout: float = Field(30.0, ge=0)  # seconds SIGTERM waits for in-flight requests
    client_body_timeout: float = Field(30.0, gt=0)  # seconds a client may take to send its body
    client_idle_timeout: float = Field(75.0, gt=0)  # keep-alive, and a connection that sends nothing
    # Output tokens reserved when the client gives no max_tokens (reservation sizing caps it).
    default_max_output_tokens: int = Field(4096, ge=1)
    # Stream enforcement: end a stream whose output passes its reservation by this share.
    stream_overrun_slack: float = Field(0.1, ge=0)

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if v != "memory" and not re.match(r"^(redis|rediss|unix)://", v):
            raise ValueError("must be `memory` or a redis://, rediss:// or unix:// URL")
        if re.match(r"^unix://[^/]*(\?|$)", v):  # no path: the store would fail at connect
            raise ValueError("a unix:// URL needs the socket's path, e.g. unix:///run/redis.sock?db=0")
        return v

    @field_validator("providers")
    @classmethod
    def _provider_names(cls, v: dict[str, ProviderConfig]) -> dict[str, ProviderConfig]:
        if not v:
            raise ValueError("at least one provider is needed")
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in ("v1", "v1beta", "admin"):
                raise ValueError(f"provider name {name!r} must be [A-Za-z0-9_-] and not a reserved route")
        return v

    @model_validator(mode="after")
    def _references(self) -> Config:
        for glob, target in self.models.items():
            for provider in [target] if isinstance(target, str) else [d.provider for d in target]:
                if provider not in self.providers:
                    raise ValueError(f"models.{glob}: unknown provider {provider!r}")
        families = {"openai": "openai", "azure": "openai", "anthropic": "anthropic", "gemini": "gemini"}
        for name, p in self.providers.items():
            for fb in p.fallbacks:
                if fb not in self.providers or fb == name:
                    raise ValueError(f"providers.{name}.fallbacks: unknown provider {fb!r}")
                if families[self.providers[fb].type] != families[p.type]:
                    raise ValueError(f"providers.{name}.fallbacks: {fb!r} speaks another API ({self.providers[fb].type})")
        if self.default_provider and self.default_provider not in self.providers:
            raise ValueError(f"default_provider: unknown provider {self.default_provider!r}")
        if self.default_plan not in self.plans:
            raise ValueError(f"default_plan: no plan named {self.default_plan!r} under plans")
        for name, user in self.users.items():
            if user.plan and user.plan not in self.plans:
                raise ValueError(f"users.{name}.plan: no plan named {user.plan!r}")
        for i, key in enumerate(self.keys):
            if key.plan and key.plan not in self.plans:
                raise ValueError(f"keys.{i}.plan: no plan named {key.plan!r}")
        return self


# ---------------------------------------------------------------- loading


def _substitute(value: Any, where: list[str]) -> Any:
    if isinstance(value, str):

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            env = os.environ.get(name)
            if env is not None and (env != "" or default is None):
                return env
            if default is not None:
                return default
            raise ConfigError(
                f"{'.'.join(where)}: environment variable {name} is not set "
                f"(set it, or write ${{{name}:-}} for an empty default)"
            )

        return _ENV_REF.sub(repl, value)
    if isinstance(value, dict):
        return {k: _substitute(v, [*where, str(k)]) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, [*where, str(i)]) for i, v in enumerate(value)]
    return value


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the deepest node along `loc` in a composed YAML tree."""
    line = None
    for part in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        nxt: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(part):
                    nxt = v
                    line = k.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            nxt = node.value[part]
        node = nxt
    if node is not None:
        line = node.start_mark.line + 1
    return line


def parse_config(text: str, source: str = "<config>") -> Config:
    try:
        raw = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{source}{where}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of settings")
    try:
        data = _substitute(raw, [])
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        line = _line_of(node, loc)
        field = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (and {e.error_count() - 1} more problems)" if e.error_count() > 1 else ""
        return _raise(f"{source}{f':{line}' if line else ''}: {field}: {msg}{more}")


def _raise(message: str) -> Config:
    raise ConfigError(message)


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the config file: {e.strerror}") from None
    return parse_config(text, str(p))


def resolve_path(config_file: str | Path, relative: str) -> Path:
    """Paths in the config are relative to the working directory, else to the config's folder."""
    p = Path(relative)
    if p.is_absolute() or p.exists():
        return p
    beside = Path(config_file).parent / p
    if beside.exists():
        return beside
    # The shipped pricing file also lives two levels up from config/ in a checkout.
    return p
