"""Loading VLMs through transformers, per-family knowledge and the tiny-VLM kit."""
