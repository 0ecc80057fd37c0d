"""API keys at the ingress (Ray Serve LLM has none).

Keys come from a file (or a mounted Secret): one per line, blank lines and
``#`` comments ignored. A line may hold the key itself or ``sha256:<hex>`` of it,
so the file need not contain usable secrets, optionally followed by
``models=a,b``: the only models (base or adapter names) that key may use. Presented keys are hashed and
compared with ``hmac.compare_digest`` against every stored hash (no early exit).
A key is known by its whole digest wherever it separates callers (rate-limit
buckets, response-cache scope): a shortened one would let two keys whose digests
share a prefix share limits and cached answers. Only logs show the short form.

``KeysFile`` re-reads the file when it changes (and on SIGHUP), so revoking a key
needs no restart; a file that no longer parses leaves the previous keys in force.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("qwen_serve.auth")


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(key: str) -> str:
    """The id of a key: its whole SHA-256 digest (not secret, safe for logs)."""
    return key_digest(key)


def short_id(kid: str) -> str:
    """A key id shortened for log lines (never for telling keys apart)."""
    return kid[:8]


class ApiKeyError(ValueError):
    pass


@dataclass(frozen=True)
class ApiKeys:
    digests: tuple[str, ...]
    # (digest, models) for keys limited to some models; others may use every model.
    restricted: tuple[tuple[str, frozenset[str]], ...] = ()

    def models_for(self, kid: str) -> frozenset[str] | None:
        """The models key ``kid`` may use, or None for all of them."""
        for digest, models in self.restricted:
            if digest == kid:
                return models
        return None

    @classmethod
    def load(cls, path: str | Path) -> "ApiKeys":
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ApiKeyError(f"cannot read API keys file {path}: {exc.strerror}") from None
        digests = []
        restricted = []
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            line, *options = line.split()
            for option in options:
                name, _, value = option.partition("=")
                models = frozenset(m for m in value.split(",") if m)
                if name != "models" or not models:
                    raise ApiKeyError(f"{path}:{number}: after the key only 'models=a,b' may follow")
                restricted.append(models)
            if line.startswith("sha256:"):
                digest = line[len("sha256:"):].lower()
                if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                    raise ApiKeyError(f"{path}:{number}: sha256: must be followed by 64 hex digits")
                digests.append(digest)
            elif any(not "!" <= c <= "~" for c in line):
                # A bearer token is printable ASCII without spaces (RFC 6750); anything else
                # could never be presented (HTTP headers arrive latin-1 decoded) or is a typo.
                raise ApiKeyError(f"{path}:{number}: a key must be printable ASCII without spaces")
            else:
                digests.append(key_digest(line))
            if options:
                restricted[-1] = (digests[-1], restricted[-1])
        if not digests:
            raise ApiKeyError(f"API keys file {path} holds no keys")
        return cls(tuple(digests), tuple(restricted))

    def check(self, presented: str | None) -> str | None:
        """The key's id if it is valid, else None. Constant time in the key."""
        if not presented:
            return None
        digest = key_digest(presented)
        match = False
        for stored in self.digests:
            match |= hmac.compare_digest(stored, digest)
        return digest if match else None


class KeysFile:
    """API keys from a file, re-read when the file changes.

    ``reload_if_changed`` is cheap (one ``stat``) and polled by the ingress every
    second; a Kubernetes Secret update swaps a symlink, which changes the inode.
    Requests in flight are not touched: a key is checked once, at admission.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp = self._stat()
        self._keys = ApiKeys.load(self.path)  # raises ApiKeyError: a bad file fails the start

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def check(self, presented: str | None) -> str | None:
        return self._keys.check(presented)

    def models_for(self, kid: str) -> frozenset[str] | None:
        return self._keys.models_for(kid)

    def reload(self) -> bool:
        """Re-read the file now; True if the new keys are in force."""
        self._stamp = self._stat()
        try:
            keys = ApiKeys.load(self.path)
        except ApiKeyError as exc:
            logger.error("API keys not reloaded, the previous %d stay in force: %s",
                         len(self._keys.digests), exc)
            return False
        if keys != self._keys:
            logger.warning("API keys reloaded from %s: %d keys (were %d)", self.path,
                           len(keys.digests), len(self._keys.digests))
        self._keys = keys
        return True

    def reload_if_changed(self) -> bool:
        return self._stat() != self._stamp and self.reload()


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
