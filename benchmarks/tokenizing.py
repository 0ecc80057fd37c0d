"""Token counting for building prompts of a requested length.

Why: synthetic workloads promise "N input tokens", which only holds if prompts are
measured with the served model's tokenizer. Preferred source is the server itself
(``POST /tokenize`` / ``/detokenize``, offered by vLLM and by the qwen-serve
ingress), so no tokenizer files are needed on the client; a local
``tokenizer.json`` works too (``--tokenizer``). Generic OpenAI servers have neither:
then whitespace words approximate tokens and the run's config says so.
Measured figures never depend on this — they use the server's ``usage``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import httpx


class TokenCounter(Protocol):
    name: str
    exact: bool

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ServerTokenizer:
    """Uses the server's /tokenize and /detokenize endpoints (vLLM API shape)."""

    exact = True

    def __init__(self, base_url: str, model: str, headers: dict[str, str] | None = None):
        self.name = f"server:{base_url}/tokenize"
        self._model = model
        self._client = httpx.Client(
            base_url=base_url, headers=headers or {}, timeout=30.0, trust_env=False
        )

    def encode(self, text: str) -> list[int]:
        resp = self._client.post(
            "/tokenize", json={"model": self._model, "prompt": text, "add_special_tokens": False}
        )
        resp.raise_for_status()
        return list(resp.json()["tokens"])

    def decode(self, ids: list[int]) -> str:
        resp = self._client.post("/detokenize", json={"model": self._model, "tokens": ids})
        resp.raise_for_status()
        return str(resp.json()["prompt"])

    def close(self) -> None:
        self._client.close()


class LocalTokenizer:
    """A HuggingFace ``tokenizer.json`` (file or model folder) via ``tokenizers``."""

    exact = True

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer  # optional dependency, imported on use

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        self.name = f"local:{file}"
        self._tok = Tokenizer.from_file(str(file))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


class WordTokenizer:
    """Fallback: one whitespace-separated word ≈ one token (approximate)."""

    name = "approx:words"
    exact = False

    def __init__(self) -> None:
        self._words: dict[str, int] = {}
        self._ids: list[str] = []

    def encode(self, text: str) -> list[int]:
        out = []
        for word in text.split():
            if word not in self._words:
                self._words[word] = len(self._ids)
                self._ids.append(word)
            out.append(self._words[word])
        return out

    def decode(self, ids: list[int]) -> str:
        return " ".join(self._ids[i] for i in ids)


def open_tokenizer(
    local_path: str | None, base_url: str, model: str, headers: dict[str, str] | None = None
) -> TokenCounter:
    """Local file if given, else the server's endpoints if they answer, else words."""
    if local_path:
        return LocalTokenizer(local_path)
    server = ServerTokenizer(base_url, model, headers)
    try:
        if server.encode("hello world") and server.decode(server.encode("hello")).strip():
            return server
    except (httpx.HTTPError, KeyError, ValueError):
        pass
    server.close()
    return WordTokenizer()
