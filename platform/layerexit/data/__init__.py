"""Datasets and prompts: JSONL prompt files, chat/Alpaca templates, response masking."""
