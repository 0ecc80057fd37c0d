"""CLI subcommands ``extract``, ``summarize`` and ``translate`` for ``qwen-serve``.

The lead's CLI calls :func:`register` with its subparsers; each subcommand sets
``func`` (``func(args) -> int`` exit code). ``python -m serving.client`` runs them
standalone via :func:`main`.

Exit codes (distinct so scripts can tell what failed):

==  =====================================================================
0   success
2   usage error: bad arguments, unreadable input, invalid JSON Schema,
    a chunk budget that cannot fit the model's context
3   the server refused or could not be reached (after retries on 429/5xx)
4   extract: the model's output is not strict JSON (after the retry)
5   extract: the output is JSON but violates the schema (after the retry)
6   extract: the output was cut by ``--max-tokens`` (after the retry)
7   translate: some items failed; all others were written, in order
==  =====================================================================
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .extract import (SENTIMENT_SYSTEM, ExtractionError, SchemaError, extract_json,
                      sentiment_prompt, sentiment_schema)
from .flags import add_url_argument, resolve_url
from .http import API_KEY_ENV, APIError, AsyncClient, Client
from .summarize import DEFAULT_SYSTEM as SUMMARY_SYSTEM
from .summarize import plan_document, summarize
from .translate import aiter_translate, read_jsonl

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_API = 3
EXIT_INVALID_JSON = 4
EXIT_SCHEMA = 5
EXIT_TRUNCATED = 6
EXIT_PARTIAL = 7

_EXTRACT_EXIT = {"invalid_json": EXIT_INVALID_JSON, "schema": EXIT_SCHEMA,
                 "truncated": EXIT_TRUNCATED}
BUILTIN_SCHEMAS: dict[str, Callable[[], dict]] = {"sentiment": sentiment_schema}


class UsageError(Exception):
    """Bad input from the user; exits with :data:`EXIT_USAGE`."""


def register(subparsers: Any) -> None:
    """Add ``extract``, ``summarize`` and ``translate`` to an argparse subparsers object."""
    fmt = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "extract", formatter_class=fmt,
        help="turn text into JSON that validates against a JSON Schema",
        description="Send TEXT (or the contents of FILE, '-' for stdin) with the schema as "
                    "response_format so the engine's guided decoding enforces it; parse "
                    "strictly, validate with jsonschema, retry once on failure.\n"
                    "Ready example: qwen-serve extract --example sentiment\n\n"
                    "exit codes: 0 ok, 2 usage, 3 server, 4 not JSON, 5 schema violation, "
                    "6 truncated")
    _common(p)
    p.add_argument("input", nargs="?", help="TEXT, FILE, or '-' for stdin")
    p.add_argument("--schema", help="JSON Schema file, or a built-in name: "
                   + ", ".join(BUILTIN_SCHEMAS))
    p.add_argument("--example", choices=["sentiment"],
                   help="the seed's example: three product reviews -> [{text, sentiment, "
                        "confidence}] (input, if given, is reviews one per line)")
    p.add_argument("--system", help="role for the system prompt")
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--retries", type=int, default=1, help="extra attempts on invalid output")
    p.set_defaults(func=_run_guarded(cmd_extract), command_name="extract")

    p = subparsers.add_parser(
        "summarize", formatter_class=fmt,
        help="summarize a document of any length (token-exact chunks, map-reduce)",
        description="Chunk FILE by the server's own tokenizer with exact overlap, summarize "
                    "each chunk, then summarize the summaries (recursively if needed). A "
                    "document that fits the context is summarized in one call.\n\n"
                    "exit codes: 0 ok, 2 usage, 3 server")
    _common(p)
    p.add_argument("file", help="text file, or '-' for stdin")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="document tokens per chunk (default: as many as the context allows)")
    p.add_argument("--overlap", type=int, default=512, help="tokens shared by neighbours")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=512, help="length bound of each summary")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--system", default=SUMMARY_SYSTEM, help="role for the system prompt")
    p.add_argument("--plan", action="store_true",
                   help="print the chunk boundaries (token offsets) and exit; no generation")
    _progress(p)
    p.set_defaults(func=_run_guarded(cmd_summarize), command_name="summarize")

    p = subparsers.add_parser(
        "translate", formatter_class=fmt,
        help="translate a JSONL batch concurrently, order preserved",
        description="Each input line is a JSON string or an object with a 'text' field "
                    "(other fields are copied). Output: one JSON object per input, in input "
                    "order, with 'translation' or 'error'.\n\n"
                    "exit codes: 0 ok, 2 usage, 3 server, 7 some items failed")
    _common(p)
    p.add_argument("file", help="JSONL file, or '-' for stdin")
    p.add_argument("--to", required=True, dest="target", help="target language, e.g. en")
    p.add_argument("--from", dest="source", help="source language, e.g. zh")
    p.add_argument("--field", default="text", help="input field holding the text")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("-o", "--output", help="write JSONL here instead of stdout")
    _progress(p)
    p.set_defaults(func=_run_guarded(cmd_translate), command_name="translate")


def _common(p: argparse.ArgumentParser) -> None:
    add_url_argument(p)
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"bearer key (default: ${API_KEY_ENV})")
    p.add_argument("--model", help="served model (default: the first from /v1/models)")


def _progress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   default=sys.stderr.isatty(), help="progress bar on stderr")


def _run_guarded(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Map the failures every subcommand shares to their exit codes and one message."""
    def run(args: argparse.Namespace) -> int:
        try:
            return cmd(args)
        except (UsageError, SchemaError, ValueError, OSError) as exc:
            print(f"{args.command_name}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except APIError as exc:
            print(f"{args.command_name}: server error: {exc}", file=sys.stderr)
            return EXIT_API
    run.__name__ = cmd.__name__
    return run


def _read_input(value: str) -> str:
    if value == "-":
        return sys.stdin.read()
    return Path(value).read_text(encoding="utf-8")


def _client(args: argparse.Namespace) -> Client:
    return Client(resolve_url(args), args.api_key)


def cmd_extract(args: argparse.Namespace) -> int:
    system = args.system
    if args.example == "sentiment":
        schema = sentiment_schema()
        reviews = None
        if args.input is not None:
            text = _text_or_file(args.input)
            reviews = [ln for ln in text.splitlines() if ln.strip()]
        text = sentiment_prompt(reviews)
        system = system or SENTIMENT_SYSTEM
    else:
        if not args.schema:
            raise UsageError("--schema is required (or use --example sentiment)")
        if args.input is None:
            raise UsageError("give TEXT, FILE or '-'")
        schema = _load_schema(args.schema)
        text = _text_or_file(args.input)
    with _client(args) as c:
        try:
            got = extract_json(text, schema, client=c, model=args.model, system=system,
                               temperature=args.temperature, max_tokens=args.max_tokens,
                               retries=args.retries)
        except ExtractionError as exc:
            what = {"invalid_json": "output is not valid JSON",
                    "schema": "output violates the schema",
                    "truncated": "output was cut by --max-tokens"}[exc.kind]
            print(f"extract: {what} after {exc.attempts} attempt(s): {exc.detail}\n"
                  f"raw output of the last attempt:\n{exc.raw}", file=sys.stderr)
            return _EXTRACT_EXIT[exc.kind]
    print(json.dumps(got.value, ensure_ascii=False, indent=2))
    return EXIT_OK


def _text_or_file(value: str) -> str:
    if value == "-":
        return sys.stdin.read()
    p = Path(value)
    # Text that happens to be short and name an existing file is read as that file.
    if len(value) < 4096 and "\n" not in value and p.is_file():
        return p.read_text(encoding="utf-8")
    return value


def _load_schema(value: str) -> dict:
    if value in BUILTIN_SCHEMAS and not Path(value).exists():
        return BUILTIN_SCHEMAS[value]()
    try:
        schema = json.loads(Path(value).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UsageError(f"schema {value}: not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise UsageError(f"schema {value}: must be a JSON object")
    return schema


def cmd_summarize(args: argparse.Namespace) -> int:
    text = _read_input(args.file)
    with _client(args) as c:
        if args.plan:
            plan = plan_document(text, client=c, model=args.model, chunk_tokens=args.chunk_tokens,
                                 overlap=args.overlap, max_tokens=args.max_tokens,
                                 system=args.system)
            print(plan.describe())
            return EXIT_OK
        result = summarize(text, client=c, model=args.model, chunk_tokens=args.chunk_tokens,
                           overlap=args.overlap, concurrency=args.concurrency,
                           max_tokens=args.max_tokens, temperature=args.temperature,
                           system=args.system, progress=args.progress)
    print(f"summarize: {len(result.plan.chunks)} chunk(s), {result.calls} call(s), "
          f"{result.levels} reduce level(s)", file=sys.stderr)
    print(result.summary)
    return EXIT_OK


def cmd_translate(args: argparse.Namespace) -> int:
    items = read_jsonl(_read_input(args.file).splitlines(), args.field)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        failed = asyncio.run(_translate_to(out, items, args))
    finally:
        if args.output:
            out.close()
    for item in failed:
        where = f"HTTP {item.status}: " if item.status is not None else ""
        print(f"translate: item {item.index} failed: {where}{item.error}", file=sys.stderr)
    if failed:
        print(f"translate: {len(failed)} of {len(items)} item(s) failed", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


async def _translate_to(out: Any, items: list, args: argparse.Namespace) -> list:
    """Write each result as soon as every earlier one is written; return the failures."""
    failed = []
    async with AsyncClient(resolve_url(args), args.api_key) as c:
        async for item in aiter_translate(
                items, target=args.target, source=args.source, client=c, model=args.model,
                concurrency=args.concurrency, max_tokens=args.max_tokens,
                temperature=args.temperature, progress=args.progress):
            out.write(json.dumps(item.to_json(), ensure_ascii=False) + "\n")
            out.flush()
            if not item.ok:
                failed.append(item)
    return failed


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m serving.client SUBCOMMAND ...``."""
    parser = argparse.ArgumentParser(prog="qwen-serve")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)
