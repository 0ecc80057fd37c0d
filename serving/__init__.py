"""qwen-serve: vLLM engines behind a Ray Serve-managed router, speaking the OpenAI API."""

__version__ = "0.1.0"
