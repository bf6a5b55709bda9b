"""Authenticate: the client's virtual key (wherever its SDK sent it) → the subject it is metered as.

Keys are held only as sha256 digests; a presented key is hashed and looked up, so no secret is
ever compared byte by byte.
"""
from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from multidict import CIMultiDictProxy, MultiMapping

from .config import Config, Limits
from .errors import StoreError, StoreUnavailable, Unauthorized
from .quota.store import StoredKey, UsageStore
from .records import Subject

END_USER_HEADER = "x-meterproxy-user"
KEY_PREFIX = "mp-"  # store-created keys start with this (config keys are whatever ops chose)
_MAX_CACHED_KEYS = 100_000
_MAX_CACHED_SUBJECTS = 250_000  # (key, end user) pairs whose subject is kept


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


class _Presented:
    """What a presented key resolved to, worked out once per distinct key: its digest and, for a
    config file's key, its entry and subjects (a plain key has one; a trusted key's end users
    each have theirs)."""

    __slots__ = ("digest", "entry", "subject", "users")

    def __init__(self, digest: str, entry: KeyEntry | None) -> None:
        self.digest = digest
        self.entry = entry
        self.subject: Subject | None = None
        self.users: dict[str, Subject] | None = None  # x-meterproxy-user -> subject, for a trusted key


class KeyRing:
    """Digest → key entry: the config's keys in memory, keys created through the admin API or CLI
    in the store.

    A store-created key is looked up in the store on every request that presents it (one HGET):
    that is what makes creating and revoking a key take effect on every replica at once, with no
    cache to invalidate. Config keys never touch the store. When the store is down, a key this
    process has already seen keeps working if `on_store_failure` is open (it was valid a moment
    ago), and unknown keys get 503, not 401: the key may well be valid.
    """

    def __init__(self, config: Config, store: UsageStore | None = None) -> None:
        self._config = config
        self._store = store
        self._by_digest: dict[str, KeyEntry] = {}
        self._extra: dict[str, KeyEntry] = {}  # store-created keys seen lately (outage fallback)
        # Per-request work done once per distinct value (bounded: cleared when full).
        self._presented: dict[str, _Presented] = {}  # presented key -> its digest, config entry, subjects
        self._subjects: dict[tuple[str, str | None], Subject] = {}  # store keys: (key id, end-user header) -> subject
        for k in config.keys:
            digest = k.key_sha256 or sha256_hex(k.key or "")
            own = k if k.values() else None
            self._by_digest[digest] = KeyEntry(key_id_of(digest), k.user, k.team, k.plan, k.trusted_user_header, own)

    def adopt(self, old: KeyRing) -> None:
        """Keep keys a previous ring learned outside the config (store-created keys)."""
        for digest, entry in old._extra.items():
            self._extra.setdefault(digest, entry)

    def add(self, digest: str, entry: KeyEntry) -> None:
        self._extra[digest] = entry

    def remove(self, digest: str) -> None:
        self._extra.pop(digest, None)

    def entries(self) -> Mapping[str, KeyEntry]:
        """The config's keys (store-created ones live in the store: `list_keys`)."""
        return self._by_digest

    def config_key_ids(self) -> frozenset[str]:
        return frozenset(e.key_id for e in self._by_digest.values())

    def _resolved(self, key: str) -> _Presented:
        hit = self._presented.get(key)
        if hit is None:
            if len(self._presented) >= _MAX_CACHED_KEYS:
                self._presented.clear()
            digest = sha256_hex(key)
            hit = self._presented[key] = _Presented(digest, self._by_digest.get(digest))
        return hit

    def configured(self, key: str | None) -> KeyEntry | None:
        """The entry of a key from the config file, without a coroutine: None for anything else."""
        return self._resolved(key).entry if key else None

    def configured_subject(self, key: str | None, end_user: str | None) -> Subject | None:
        """`subject` of a key from the config file, without a coroutine, in one lookup per distinct
        key (and one per end user a trusted key names); None for anything else: `lookup` it."""
        if not key:
            return None
        hit = self._resolved(key)
        subject = hit.subject
        if subject is not None and not (end_user and subject.trusted):
            return subject  # the key's own, without reaching its entry (a cache miss with many keys)
        entry = hit.entry
        if entry is None:
            return None
        if entry.trusted and end_user:
            users = hit.users
            if users is None:
                users = hit.users = {}
            subject = users.get(end_user)
            if subject is None:
                if len(users) >= _MAX_CACHED_SUBJECTS:
                    users.clear()
                subject = users[end_user] = self._subject(entry, end_user)
            return subject
        if hit.subject is None:
            hit.subject = self._subject(entry, None)
        return hit.subject

    async def lookup(self, key: str | None) -> KeyEntry:
        if not key:
            raise Unauthorized("Missing API key: send your meterproxy virtual key as your SDK's API key.")
        entry = self.configured(key)
        if entry is not None:
            return entry
        digest = self._resolved(key).digest
        if self._store is None:
            entry = self._extra.get(digest)
            if entry is None:
                raise Unauthorized("Invalid API key: this key is not known to meterproxy.")
            return entry
        try:
            stored = await self._store.get_key(digest)
        except StoreError as e:
            cached = self._extra.get(digest)
            if cached is not None and self._config.on_store_failure == "open":
                return cached
            raise StoreUnavailable("The key store is unreachable, so this key cannot be checked; try again "
                                   "shortly.", headers={"retry-after": "1"}) from e
        if stored is None:
            self._extra.pop(digest, None)  # revoked (or never existed)
            raise Unauthorized("Invalid API key: this key is not known to meterproxy.")
        entry = KeyEntry(stored.key_id, stored.user, stored.team, stored.plan, stored.trusted)
        if digest in self._extra or len(self._extra) < _MAX_CACHED_KEYS:
            self._extra[digest] = entry
        return entry

    def subject(self, entry: KeyEntry, end_user: str | None) -> Subject:
        """The subject a request is metered as; a trusted key may name its own end user."""
        # A key's fields never change (store keys are only revoked), so (key id, header) is enough.
        cache_key = (entry.key_id, end_user if entry.trusted else None)
        hit = self._subjects.get(cache_key)
        if hit is not None:
            return hit
        if len(self._subjects) >= _MAX_CACHED_SUBJECTS:
            self._subjects.clear()
        subject = self._subjects[cache_key] = self._subject(entry, end_user)
        return subject

    def _subject(self, entry: KeyEntry, end_user: str | None) -> Subject:
        user = entry.user
        if entry.trusted and end_user:
            user = end_user.strip()[:256] or user
        ucfg = self._config.users.get(user)
        team = (ucfg.team if ucfg and ucfg.team else None) or entry.team
        plan = (ucfg.plan if ucfg and ucfg.plan else None) or entry.plan or self._config.default_plan
        return Subject(user=user, team=team, plan=plan, key_id=entry.key_id, trusted=entry.trusted)


def new_key(user: str, team: str | None = None, plan: str | None = None, trusted: bool = False,
            now: float = 0.0) -> tuple[str, StoredKey]:
    """A fresh random virtual key and the record the store keeps of it (its sha256, never itself)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    digest = sha256_hex(key)
    return key, StoredKey(key_id_of(digest), digest, user, team, plan, trusted, now)
