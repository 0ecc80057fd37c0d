"""Client library for the seed's three workflows on a qwen-serve stack.

Application code::

    from serving.client import extract_json, summarize, translate_batch

Each has an async twin (``aextract_json``, ``asummarize``, ``atranslate_batch``) and
takes either ``client=`` (:class:`Client` / :class:`AsyncClient`) or ``base_url=`` and
``api_key=`` (default ``http://127.0.0.1:8000`` and ``$QWEN_SERVE_API_KEY``).
"""

from .extract import (Extraction, ExtractionError, SchemaError, aextract_json, extract_json,
                      sentiment_prompt, sentiment_reviews, sentiment_schema)
from .http import APIError, AsyncClient, Client, RetryPolicy
from .summarize import Plan, Summary, aplan_document, asummarize, plan_document, summarize
from .translate import TranslationItem, atranslate_batch, translate_batch

__all__ = [
    "APIError", "AsyncClient", "Client", "Extraction", "ExtractionError", "Plan",
    "RetryPolicy", "SchemaError", "Summary", "TranslationItem", "aextract_json",
    "aplan_document", "asummarize", "atranslate_batch", "extract_json", "plan_document",
    "sentiment_prompt", "sentiment_reviews", "sentiment_schema", "summarize",
    "translate_batch",
]
