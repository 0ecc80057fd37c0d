"""The request's shape: bounds on what a body may contain, and what it costs.

Why the ingress checks shapes the engine would also check: cost. vLLM accepts a
1,024-prompt batch or ``best_of`` 1000 as one request, so a limiter that prices the
first prompt lets one request run a thousand sequences. And a body nested 5,000 deep
made ``json.loads`` raise RecursionError (a 500). So every list or map a request
carries is bounded (``server.limits``), each refusal a 400 naming its ``param``, and
:func:`work` prices all of a request's prompts and completions.

The checks are structural and cheap (lengths, types, ranges); what the model makes
of valid values (a prompt longer than the context, an unknown tool) stays the
engine's job.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import LimitsConfig

CHARS_PER_TOKEN = 4  # a deliberately generous estimate of a prompt's tokens from its text
DEFAULT_MAX_TOKENS = 256  # what a request without max_tokens is priced at
# OpenAI's chat roles, plus vLLM's "developer" alias; anything else is a 400 there too.
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
LOGIT_BIAS_RANGE = 100  # OpenAI caps each bias at ±100


class ShapeError(ValueError):
    """A body outside the bounds; ``param`` is the field to name in the 400."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Work:
    """What a request asks the engine for: prompt tokens and sequences to generate."""

    prompt_tokens: int
    sequences: int
    max_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.sequences * self.max_tokens


def depth_within(value: object, limit: int) -> bool:
    """Whether ``value`` nests at most ``limit`` lists/objects deep (iterative: no recursion)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return False
        children = node.values() if isinstance(node, dict) else node
        # Only containers are pushed: a batch of token ids is millions of scalars.
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return True


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(body: dict, name: str, cap: int, what: str) -> None:
    value = body.get(name)
    if isinstance(value, (list, dict)) and len(value) > cap:
        raise ShapeError(name, f"{name} has {len(value)} {what}; at most {cap} are allowed.")


def prompts(body: dict) -> list[object]:
    """The prompts of a /v1/completions body: one, or each entry of a batch.

    A prompt is a string or a list of token ids; a list of those is a batch.
    """
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not all(_int(t) for t in prompt):
        return prompt
    return [] if prompt is None else [prompt]


def check(body: dict, limits: LimitsConfig) -> None:
    """Raise ShapeError for the first bound ``body`` breaks."""
    if not depth_within(body, limits.max_json_depth):
        raise ShapeError(None, f"The request body nests deeper than {limits.max_json_depth} levels.")
    n = body.get("n")
    if n is not None and not (_int(n) and 1 <= n <= limits.max_n):
        raise ShapeError("n", f"n must be an integer from 1 to {limits.max_n}.")
    best_of = body.get("best_of")
    if best_of is not None and not (_int(best_of) and 1 <= best_of <= limits.max_n):
        raise ShapeError("best_of", f"best_of must be an integer from 1 to {limits.max_n}.")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and not (_int(value) and value >= 1):
            raise ShapeError(name, f"{name} must be a positive integer.")
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool)
                                    or not isinstance(temperature, (int, float))
                                    or not 0 <= temperature <= 2):
        raise ShapeError("temperature", "temperature must be a number from 0 to 2.")
    top_p = body.get("top_p")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ShapeError("top_p", "top_p must be a number greater than 0 and at most 1.")
    _count(body, "messages", limits.max_messages, "messages")
    _count(body, "stop", limits.max_stop, "stop sequences")
    _count(body, "tools", limits.max_tools, "tools")
    _count(body, "logit_bias", limits.max_logit_bias, "entries")
    _check_logit_bias(body.get("logit_bias"))
    _check_messages(body.get("messages"))
    batch = prompts(body)
    if len(batch) > limits.max_prompts:
        raise ShapeError("prompt", f"prompt is a batch of {len(batch)}; at most "
                                   f"{limits.max_prompts} prompts are allowed per request.")
    sequences = len(batch or [None]) * max(n or 1, best_of or 1)
    if sequences > limits.max_sequences:
        raise ShapeError("n" if n else "prompt",
                         f"This request would generate {sequences} sequences (prompts × n); "
                         f"at most {limits.max_sequences} are allowed.")


def _check_logit_bias(bias: object) -> None:
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise ShapeError("logit_bias", "logit_bias must be an object of token id to bias.")
    for value in bias.values():
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
            raise ShapeError("logit_bias", f"Each logit_bias value must be a number from "
                                           f"-{LOGIT_BIAS_RANGE} to {LOGIT_BIAS_RANGE}.")


def _check_messages(messages: object) -> None:
    if messages is None:
        return
    if not isinstance(messages, list):
        raise ShapeError("messages", "messages must be a list of message objects.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ShapeError(f"messages[{i}]", f"messages[{i}] must be an object.")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ShapeError(f"messages[{i}].role",
                             f"messages[{i}].role must be one of {', '.join(sorted(ROLES))}; "
                             f"got {role!r}.")


def _prompt_tokens(prompt: object) -> int:
    if isinstance(prompt, str):
        return len(prompt) // CHARS_PER_TOKEN
    if isinstance(prompt, list):  # token ids: exact
        return len(prompt)
    return 0


def work(body: dict, prompt_text: str, generates: bool = True) -> Work:
    """The most a (shape-checked) request can cost.

    Chat prompts are priced from ``prompt_text`` (all messages); completions from every
    prompt of the batch, token-id prompts by their length. Each prompt generates
    ``max(n, best_of)`` sequences of ``max_tokens``. Routes that generate nothing
    (/tokenize, /detokenize) cost their prompt only.
    """
    batch = prompts(body)
    prompt_tokens = sum(map(_prompt_tokens, batch)) if batch else len(prompt_text) // CHARS_PER_TOKEN
    if not generates:
        return Work(prompt_tokens, 0, 0)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if not _int(max_tokens) or max_tokens < 1:
        max_tokens = DEFAULT_MAX_TOKENS
    per_prompt = max(v for v in (body.get("n"), body.get("best_of"), 1) if _int(v))
    return Work(prompt_tokens, len(batch or [None]) * per_prompt, max_tokens)


def estimate_tokens(body: dict, prompt_text: str, generates: bool = True) -> int:
    """:func:`work` in tokens: what the rate limiter charges at admission."""
    return work(body, prompt_text, generates).tokens
