"""Exit points over a stock Hugging Face causal LM (LLaMA, Mistral, Qwen2 layouts).

Layer numbering follows transformers' ``hidden_states`` tuple: layer ``l`` (1..L) is the output of the
l-th decoder layer, layer L is the final layer. Exiting at ``l`` means ``lm_head(norm(h_l))``: the model's own
final norm and LM head, so no new weights exist and a LITE-trained checkpoint loads in plain transformers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from layerexit.errors import ConfigError, ModelSpecError


@dataclass(frozen=True)
class DecoderParts:
    """The pieces of a LLaMA-family model that early exit needs, found by attribute, not by class."""

    model: nn.Module  # the *ForCausalLM
    base: nn.Module  # model.model
    embed: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module
    rotary: nn.Module | None
    # Exit adapters (frozen-base recipe): layer -> module applied to h_l before the shared norm + head.
    # Empty for LITE checkpoints, whose exits use the shared norm + head directly.
    adapters: Mapping[int, nn.Module] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def config(self):
        return self.model.config


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Find embeddings, decoder layers, final norm and LM head; fail clearly for other layouts."""
    base = getattr(model, "model", None)
    needed = {
        "model.model": base,
        "model.model.layers": getattr(base, "layers", None),
        "model.model.norm": getattr(base, "norm", None),
        "model.model.embed_tokens": getattr(base, "embed_tokens", None),
        "model.lm_head": getattr(model, "lm_head", None),
    }
    missing = [name for name, value in needed.items() if value is None]
    if missing:
        raise ModelSpecError(
            f"{type(model).__name__} lacks {', '.join(missing)}",
            "early exit supports LLaMA-family causal LMs (LLaMA, Mistral, Qwen2 layouts)",
        )
    return DecoderParts(
        model=model,
        base=base,
        embed=base.embed_tokens,
        layers=base.layers,
        norm=base.norm,
        head=model.lm_head,
        rotary=getattr(base, "rotary_emb", None),
        adapters=dict(getattr(model, ADAPTERS_ATTR, None) or {}),
    )


# Adapters ride on the model object without being registered as submodules, so the base model's
# state_dict, save_pretrained and optimizer see the stock weights only.
ADAPTERS_ATTR = "_layerexit_exit_adapters"


def attach_exit_adapters(model: nn.Module, adapters: Mapping[int, nn.Module] | None) -> None:
    """Make every exit path (engine, traces, alignment, training) use ``adapters`` (layer -> module)."""
    object.__setattr__(model, ADAPTERS_ATTR, dict(adapters or {}))


def exit_hidden(parts: DecoderParts, layer: int | None, hidden: torch.Tensor) -> torch.Tensor:
    """The hidden state an exit at ``layer`` feeds to the final norm: through its adapter when it has one.

    A decoder-layer adapter attends, so ``hidden`` must then be whole sequences (B, T, H)."""
    adapter = parts.adapters.get(layer) if layer is not None else None
    return hidden if adapter is None else adapter(hidden)


def check_layers(parts: DecoderParts, layers: Iterable[int]) -> list[int]:
    """Validate layer indices (1..L) and return them sorted and deduplicated."""
    layers = sorted(set(int(l) for l in layers))
    bad = [l for l in layers if not 1 <= l <= parts.num_layers]
    if bad:
        raise ConfigError(
            f"layer(s) {bad} do not exist: the model has layers 1..{parts.num_layers}",
            f"choose exit layers between 1 and {parts.num_layers}",
        )
    return layers


def exit_logits(parts: DecoderParts, hidden: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """Decode a layer's pre-norm hidden state through its adapter (if any), the final norm and the shared LM head."""
    # Shape: hidden (..., H) -> logits (..., V)
    return parts.head(parts.norm(exit_hidden(parts, layer, hidden)))


def default_position_ids(attention_mask: torch.Tensor | None, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
    """Positions that skip left padding, as transformers' ``generate`` computes them."""
    if attention_mask is None:
        pos = torch.arange(past_length, past_length + input_ids.shape[1], device=input_ids.device)
        return pos.unsqueeze(0).expand(input_ids.shape[0], -1)
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.clamp(min=0)
    return pos[:, -input_ids.shape[1] :]


@dataclass
class LayerInputs:
    """What every decoder layer takes besides the hidden state, computed once per forward."""

    attention_mask: object
    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None


def prepare_layer_inputs(
    parts: DecoderParts,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    past_key_values=None,
) -> LayerInputs:
    """Build the causal mask and rotary embeddings the way the model's own forward does."""
    from transformers.masking_utils import create_causal_mask

    mask = create_causal_mask(
        config=parts.config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        cache=past_key_values,  # transformers 5.24 renamed it (past_key_values is removed in 5.40)
        position_ids=position_ids,
    )
    rope = parts.rotary(inputs_embeds, position_ids=position_ids) if parts.rotary is not None else None
    return LayerInputs(mask, position_ids, rope)


def run_layers(
    parts: DecoderParts,
    hidden: torch.Tensor,
    start: int,
    end: int,
    inputs: LayerInputs,
    past_key_values=None,
) -> torch.Tensor:
    """Run decoder layers ``start+1 .. end`` (1-based, inclusive) on ``hidden`` = output of layer ``start``."""
    for layer in parts.layers[start:end]:
        out = layer(
            hidden,
            attention_mask=inputs.attention_mask,
            position_ids=inputs.position_ids,
            cache=past_key_values,  # transformers >= 5.24 name (past_key_values is removed in 5.40)
            use_cache=past_key_values is not None,
            position_embeddings=inputs.position_embeddings,
        )
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden


def forward_to_layer(
    model: nn.Module,
    input_ids: torch.Tensor,
    layer: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the model only up to ``layer`` and return that layer's pre-norm hidden states (B, T, H)."""
    parts = decoder_parts(model)
    (layer,) = check_layers(parts, [layer])
    embeds = parts.embed(input_ids)
    inputs = prepare_layer_inputs(parts, embeds, attention_mask, default_position_ids(attention_mask, input_ids))
    return run_layers(parts, embeds, 0, layer, inputs)


def early_exit_logits(
    model: nn.Module, input_ids: torch.Tensor, layer: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits (B, T, V) from exiting at ``layer`` (through its adapter): layers above it are never computed."""
    hidden = forward_to_layer(model, input_ids, layer, attention_mask)
    return exit_logits(decoder_parts(model), hidden, layer)


def collect_hidden_states(
    model: nn.Module,
    input_ids: torch.Tensor,
    layers: Iterable[int],
    attention_mask: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """One ordinary forward of the base model, capturing the pre-norm output of each requested layer.

    Uses forward hooks, so it works with gradient checkpointing and DeepSpeed-wrapped modules, and keeps no
    tensor that autograd does not already keep.
    """
    parts = decoder_parts(model)
    layers = check_layers(parts, layers)
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for l in layers:
        def hook(_module, _args, output, l=l):
            captured[l] = output[0] if isinstance(output, tuple) else output

        handles.append(parts.layers[l - 1].register_forward_hook(hook))
    try:
        parts.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured
