"""Model loading, exit points over stock Hugging Face causal LMs, and tiny test builders."""
