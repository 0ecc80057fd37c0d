"""API keys at the ingress (Ray Serve LLM has none).

Keys come from a file (or a mounted Secret): one per line, blank lines and
``#`` comments ignored. A line may hold the key itself or ``sha256:<hex>`` of it,
so the file need not contain usable secrets. Presented keys are hashed and
compared with ``hmac.compare_digest`` against every stored hash (no early exit),
and only a short id — the first 8 hex digits of the hash — ever reaches logs.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(key: str) -> str:
    """The short, non-secret id of a key (safe for logs and labels)."""
    return key_digest(key)[:8]


class ApiKeyError(ValueError):
    pass


@dataclass(frozen=True)
class ApiKeys:
    digests: tuple[str, ...]

    @classmethod
    def load(cls, path: str | Path) -> "ApiKeys":
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ApiKeyError(f"cannot read API keys file {path}: {exc.strerror}") from None
        digests = []
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
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
        if not digests:
            raise ApiKeyError(f"API keys file {path} holds no keys")
        return cls(tuple(digests))

    def check(self, presented: str | None) -> str | None:
        """The key's short id if it is valid, else None. Constant time in the key."""
        if not presented:
            return None
        digest = key_digest(presented)
        match = False
        for stored in self.digests:
            match |= hmac.compare_digest(stored, digest)
        return digest[:8] if match else None


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
