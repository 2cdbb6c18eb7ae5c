"""Benchmarks: our /chat against a Kaito-style transformers server, vLLM's OpenAI server
and the raw vLLM engine. ``python -m bench --help``; ``make bench`` / ``make bench-quick``."""
