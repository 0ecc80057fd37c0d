"""The one way every subcommand that talks to a server is told where it is.

``extract``, ``summarize``, ``translate`` and ``bench`` all take ``--url`` (``--base-url``
is kept as an alias: the OpenAI SDK's name for the same thing) and fall back to
``$QWEN_SERVE_URL``, so one ``export`` points every workflow at a remote stack.
"""

from __future__ import annotations

import argparse
import os

from .http import DEFAULT_BASE_URL

URL_ENV = "QWEN_SERVE_URL"


def default_url() -> str:
    """``$QWEN_SERVE_URL`` if set (read at parse time, so tests and shells can change it)."""
    return os.environ.get(URL_ENV) or DEFAULT_BASE_URL


def add_url_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--url", "--base-url", dest="url", default=None,
                        help=f"stack address (default: ${URL_ENV}, else {DEFAULT_BASE_URL})")


def resolve_url(args: argparse.Namespace) -> str:
    return args.url or default_url()
