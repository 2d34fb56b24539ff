"""Early-exit decoding on token ids: exit policies, KV strategies, FLOPs accounting (no text, no HTTP)."""
