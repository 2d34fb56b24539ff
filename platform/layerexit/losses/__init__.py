"""Training losses over per-layer hidden states (pure functions, no model state)."""

from layerexit.losses.lite import LiteLossOutput, chunked_exit_cross_entropy, exit_weights, lite_loss

__all__ = ["LiteLossOutput", "chunked_exit_cross_entropy", "exit_weights", "lite_loss"]
