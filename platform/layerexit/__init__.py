"""layerexit: early-exit (LITE) training, threshold search and serving for LLaMA-family models on Ray."""

__version__ = "0.1.0"
