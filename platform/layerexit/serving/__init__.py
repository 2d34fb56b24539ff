"""Ray Serve: the early-exit model behind an OpenAI-compatible API.

- ``app``: ``build_app(args)`` and the module-level ``app`` (``serve run layerexit.serving.app:app``).
- ``deployment``: the ``EarlyExitLLM`` replica (FastAPI ingress, metrics, logs, reconfigure, health).
- ``scheduler``: dynamic batching over the engine's step iterator on a worker thread, with cancellation and
  KV-budget admission (``kv_budget``: bytes per position, the device check, reservations).
- ``choices``: a request's choices (``n`` x prompts), each its own engine row, collected or merged for streaming.
- ``protocol``: OpenAI request/response/chunk/error models and the ``early_exit`` extension.
- ``logprobs``: OpenAI ``logprobs`` shapes (completions and chat) from token ids and log-probs.
- ``chat_format``: chat messages -> prompt ids (the tokenizer's template, or Alpaca for LLaMA-2 LITE models).
- ``config``: ``ServeArgs`` (the Serve config's ``args``) and ``user_config`` -> default ExitConfig.
- ``model_source``: model specs including MLflow ``models:/name@alias``.
- ``demo_stage``: the serving stage of ``make demo``.

Nothing is imported here, so ``import layerexit.serving.protocol`` stays light (no Ray).
"""
