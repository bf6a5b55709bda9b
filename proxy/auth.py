"""Authenticate: the client's virtual key (wherever its SDK sent it) → the subject it is metered as.

Keys are held only as sha256 digests; a presented key is hashed and looked up, so no secret is
ever compared byte by byte.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from multidict import CIMultiDictProxy, MultiMapping

from .config import Config, Limits
from .errors import Unauthorized
from .records import Subject

END_USER_HEADER = "x-meterproxy-user"


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id_of(digest: str) -> str:
    """A short, non-secret id for logs, metrics and the ledger."""
    return digest[:12]


@dataclass(frozen=True, slots=True)
class KeyEntry:
    key_id: str
    user: str
    team: str | None
    plan: str | None
    trusted: bool
    limits: Limits | None = None  # limits set on the key itself


def presented_key(headers: CIMultiDictProxy[str], query: MultiMapping[str]) -> str | None:
    """The key as the client's SDK sent it: Bearer, x-api-key, api-key, x-goog-api-key or ?key=."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    for name in ("x-api-key", "api-key", "x-goog-api-key"):
        v = headers.get(name)
        if v:
            return v.strip()
    return query.get("key") or None


class KeyRing:
    """Digest → key entry, from the config (and, later, keys created in the store)."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._by_digest: dict[str, KeyEntry] = {}
        self._extra: dict[str, KeyEntry] = {}  # learned outside the config
        for k in config.keys:
            digest = k.key_sha256 or sha256_hex(k.key or "")
            own = k if k.values() else None
            self._by_digest[digest] = KeyEntry(key_id_of(digest), k.user, k.team, k.plan, k.trusted_user_header, own)

    def adopt(self, old: KeyRing) -> None:
        """Keep keys a previous ring learned outside the config (store-created keys)."""
        for digest, entry in old._extra.items():
            self._by_digest.setdefault(digest, entry)
            self._extra[digest] = entry

    def add(self, digest: str, entry: KeyEntry) -> None:
        self._by_digest[digest] = entry
        self._extra[digest] = entry

    def remove(self, digest: str) -> None:
        self._by_digest.pop(digest, None)
        self._extra.pop(digest, None)

    def entries(self) -> Mapping[str, KeyEntry]:
        return self._by_digest

    async def lookup(self, key: str | None) -> KeyEntry:
        if not key:
            raise Unauthorized("Missing API key: send your meterproxy virtual key as your SDK's API key.")
        entry = self._by_digest.get(sha256_hex(key))
        if entry is None:
            raise Unauthorized("Invalid API key: this key is not known to meterproxy.")
        return entry

    def subject(self, entry: KeyEntry, end_user: str | None) -> Subject:
        """The subject a request is metered as; a trusted key may name its own end user."""
        user = entry.user
        if entry.trusted and end_user:
            user = end_user.strip()[:256] or user
        ucfg = self._config.users.get(user)
        team = (ucfg.team if ucfg and ucfg.team else None) or entry.team
        plan = (ucfg.plan if ucfg and ucfg.plan else None) or entry.plan or self._config.default_plan
        return Subject(user=user, team=team, plan=plan, key_id=entry.key_id, trusted=entry.trusted)
