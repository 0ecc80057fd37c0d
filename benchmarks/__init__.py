"""Load-test benchmarks for OpenAI-compatible servers (``qwen-serve bench``).

Answers "what does this deployment cost me compared with plain vLLM, and where does
it saturate?". Metric definitions follow ``vllm bench serve`` so that figures from
the two tools can be compared directly (see :mod:`benchmarks.stream` and
:mod:`benchmarks.metrics`).
"""
