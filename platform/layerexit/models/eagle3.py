"""EAGLE-3 feature draft: one decoder layer over the target's own hidden states, in vLLM's checkpoint layout.

The draft reads, for the token ``x_i`` it is given, the target model's hidden states of the previous position at a
low, a middle and a high layer (``aux_layers``; ``a`` means the residual stream after ``a`` decoder layers, which is
vLLM's convention and Hugging Face's ``hidden_states[a]``), fused by ``fc`` into one hidden vector, plus the embedding
of ``x_i`` (the target's own, frozen and shared). One LLaMA decoder layer whose attention reads the concatenation
``[input_layernorm(embed); hidden_norm(fused)]`` (2 x hidden input) turns them into a prediction of ``x_{i+1}``
through ``norm`` and a pruned ``lm_head`` of ``draft_vocab_size`` rows; draft id ``j`` is target id ``j + d2t[j]``.
Later draft steps feed the layer's own pre-norm output back as the hidden input (vLLM: ``aux_output``), not ``fc``.

Weights and config are exactly what vLLM's ``llama_eagle3.py`` loads (``LlamaForCausalLMEagle3``: ``midlayer.*``,
``fc``, ``norm``, ``lm_head``, ``d2t``, ``t2d``; ``eagle_config.eagle_aux_hidden_state_layer_ids``), so
:func:`save_eagle3` writes a directory vLLM serves with ``speculative_config={"method": "eagle3", "model": DIR}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layerexit.errors import ConfigError

ARCHITECTURE = "LlamaForCausalLMEagle3"
WEIGHTS_FILE = "model.safetensors"


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """vLLM's default for EAGLE-3 targets: (2, N/2, N-3)."""
    return (2, num_layers // 2, num_layers - 3)


@dataclass(frozen=True)
class Eagle3Spec:
    """The draft's shape: one target-sized LLaMA layer, a pruned head, and which target layers it reads."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int  # the target's
    draft_vocab_size: int
    target_hidden_size: int
    target_num_layers: int
    aux_layers: tuple[int, ...]
    max_position_embeddings: int = 4096
    target: dict[str, Any] = field(default_factory=dict)  # what the draft was trained for (name, layers, vocab)

    @classmethod
    def for_target(cls, config: Any, aux_layers: tuple[int, ...] | list[int] | None = None,
                   draft_vocab_size: int | None = None, target: dict[str, Any] | None = None) -> Eagle3Spec:
        """The spec for a Hugging Face LLaMA config (the draft layer takes the target's layer shape)."""
        n = int(config.num_hidden_layers)
        heads = int(config.num_attention_heads)
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        if theta is None:
            theta = getattr(config, "rope_theta", 10000.0)
        if isinstance(rope, dict) and rope.get("rope_type", "default") != "default":
            raise ConfigError(f"the target uses rope_type {rope.get('rope_type')!r}",
                              "EAGLE-3 drafts here support LLaMA's default rotary embedding only")
        spec = cls(
            hidden_size=int(config.hidden_size), num_attention_heads=heads,
            num_key_value_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            intermediate_size=int(config.intermediate_size), rms_norm_eps=float(config.rms_norm_eps),
            rope_theta=float(theta), vocab_size=int(config.vocab_size),
            draft_vocab_size=int(draft_vocab_size or config.vocab_size),
            target_hidden_size=int(config.hidden_size), target_num_layers=n,
            aux_layers=tuple(int(a) for a in (aux_layers or default_aux_layers(n))),
            max_position_embeddings=int(getattr(config, "max_position_embeddings", 4096)),
            target=dict(target or {}),
        )
        spec.validate()
        return spec

    def validate(self) -> None:
        n = self.target_num_layers
        if not self.aux_layers:
            raise ConfigError("draft.aux_layers is empty", f"give layer ids in 1..{n - 1}, e.g. {list(default_aux_layers(n))}")
        bad = [a for a in self.aux_layers if not 1 <= a <= n - 1]
        if bad:
            raise ConfigError(f"draft.aux_layers {bad} out of range for a {n}-layer target",
                              f"use layer ids in 1..{n - 1} (vLLM's default: {list(default_aux_layers(n))})")
        if not 1 <= self.draft_vocab_size <= self.vocab_size:
            raise ConfigError(f"draft.vocab_size {self.draft_vocab_size} is larger than the model's vocabulary "
                              f"({self.vocab_size})", f"use 1..{self.vocab_size}")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["aux_layers"] = list(self.aux_layers)
        return data


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm (computed in float32, as transformers and vLLM do)."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """LLaMA rotary embedding (half-split layout). Shape: x [B, h, T, d], positions [B, T]."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = positions.to(torch.float32)[:, None, :, None] * inv  # [B, 1, T, d/2]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Eagle3Attention(nn.Module):
    """The draft layer's attention: q/k/v read 2 x hidden (embedding and fused features side by side)."""

    def __init__(self, spec: Eagle3Spec) -> None:
        super().__init__()
        h, hd = spec.hidden_size, spec.head_dim
        self.heads, self.kv_heads, self.head_dim, self.theta = (spec.num_attention_heads, spec.num_key_value_heads,
                                                               hd, spec.rope_theta)
        self.q_proj = nn.Linear(2 * h, self.heads * hd, bias=False)
        self.k_proj = nn.Linear(2 * h, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(2 * h, self.kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.heads * hd, h, bias=False)

    def project(self, x: torch.Tensor, positions: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated q [B, h, T, d] and k, v [B, kv, T, d] for inputs x [B, T, 2H] at ``positions`` [B, T]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        return rotary(q, positions, self.theta), rotary(k, positions, self.theta), v

    def expand_kv(self, kv: torch.Tensor) -> torch.Tensor:
        return kv.repeat_interleave(self.heads // self.kv_heads, dim=1) if self.heads != self.kv_heads else kv

    def out(self, ctx: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = ctx.shape
        return self.o_proj(ctx.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class Eagle3Layer(nn.Module):
    """vLLM's EAGLE-3 first decoder layer (``midlayer``), norm after residual (vLLM's default)."""

    def __init__(self, spec: Eagle3Spec) -> None:
        super().__init__()
        h = spec.hidden_size
        self.input_layernorm = RMSNorm(h, spec.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, spec.rms_norm_eps)
        self.self_attn = Eagle3Attention(spec)
        self.post_attention_layernorm = RMSNorm(h, spec.rms_norm_eps)
        self.mlp = nn.ModuleDict({
            "gate_proj": nn.Linear(h, spec.intermediate_size, bias=False),
            "up_proj": nn.Linear(h, spec.intermediate_size, bias=False),
            "down_proj": nn.Linear(spec.intermediate_size, h, bias=False),
        })

    def attn_input(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """[input_layernorm(embeds); hidden_norm(hidden)]: Shape [B, T, 2H]."""
        return torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)

    def finish(self, attn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Attention output + residual through the MLP: the pre-norm hidden state. Shape [B, T, H]."""
        residual = attn_out + residual
        x = self.post_attention_layernorm(residual)
        x = self.mlp["down_proj"](F.silu(self.mlp["gate_proj"](x)) * self.mlp["up_proj"](x))
        return x + residual


@dataclass
class DraftStep:
    """One draft forward: logits over the draft vocabulary, the pre-norm hidden state fed to the next step, and the
    keys/values of these positions (rotated) for the caller's draft KV cache."""

    logits: torch.Tensor  # [B, T, draft_vocab]
    hidden: torch.Tensor  # [B, T, H]
    keys: torch.Tensor  # [B, kv_heads, T, d]
    values: torch.Tensor  # [B, kv_heads, T, d]


class Eagle3Draft(nn.Module):
    """The trainable draft (``fc``, ``midlayer``, ``norm``, ``lm_head``) and its vocabulary map (``d2t``, ``t2d``).

    The target's embedding is shared, not owned: pass it at construction (it is kept out of ``parameters()`` and
    out of the saved weights, as vLLM expects when the draft has no ``embed_tokens``).
    """

    def __init__(self, spec: Eagle3Spec, embed_tokens: nn.Embedding | None = None) -> None:
        super().__init__()
        spec.validate()
        self.spec = spec
        h = spec.hidden_size
        self.fc = nn.Linear(spec.target_hidden_size * len(spec.aux_layers), h, bias=False)
        self.midlayer = Eagle3Layer(spec)
        self.norm = RMSNorm(h, spec.rms_norm_eps)
        self.lm_head = nn.Linear(h, spec.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(spec.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(spec.vocab_size, dtype=torch.bool))
        self.set_vocab(torch.arange(spec.draft_vocab_size))
        self._embed = [embed_tokens]  # a list: not a registered submodule, so neither trained nor saved

    # -- vocabulary ---------------------------------------------------------------------------------------------
    def set_vocab(self, target_ids: torch.Tensor | list[int]) -> None:
        """Use these target ids (any order; stored sorted) as the draft vocabulary."""
        ids = torch.as_tensor(sorted(int(i) for i in target_ids), dtype=torch.long)
        if ids.numel() != self.spec.draft_vocab_size:
            raise ConfigError(f"draft vocabulary has {ids.numel()} ids, the draft head {self.spec.draft_vocab_size}",
                              "set draft.vocab_size to the vocabulary file's size")
        if ids.numel() and (ids[0] < 0 or ids[-1] >= self.spec.vocab_size or ids.unique().numel() != ids.numel()):
            raise ConfigError("draft vocabulary ids must be distinct target ids in "
                              f"0..{self.spec.vocab_size - 1}", "rebuild it for this model's tokenizer")
        self.d2t.copy_(ids - torch.arange(ids.numel()))
        self.t2d.zero_()
        self.t2d[ids] = True

    @property
    def draft_to_target(self) -> torch.Tensor:
        """Target id of each draft id. Shape [draft_vocab]."""
        return torch.arange(self.spec.draft_vocab_size, device=self.d2t.device) + self.d2t

    def target_to_draft(self) -> torch.Tensor:
        """Draft id of each target id, -1 where the target id is outside the draft vocabulary. Shape [vocab]."""
        table = torch.full((self.spec.vocab_size,), -1, dtype=torch.long, device=self.d2t.device)
        table[self.draft_to_target] = torch.arange(self.spec.draft_vocab_size, device=self.d2t.device)
        return table

    # -- forward ------------------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._embed[0] is None:
            raise RuntimeError("Eagle3Draft has no embedding: pass the target's embed_tokens at construction")
        return self._embed[0](input_ids)

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """The target's aux hidden states, concatenated on the last dim, to one hidden vector. [.., n*Ht] -> [.., H]."""
        return self.fc(aux)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits of a pre-norm hidden state."""
        return self.lm_head(self.norm(hidden))

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None,
                attn_mask: torch.Tensor | None = None) -> DraftStep:
        """One pass over T new positions.

        Shape: embeds, hidden [B, T, H] (hidden: ``fuse(aux)`` for positions whose features came from the target,
        the previous step's ``DraftStep.hidden`` for chained drafts); positions [B, T]; past (k, v) [B, kv, S, d];
        attn_mask: boolean [B, 1, T, S + T] (True = may attend), default causal over the new positions with every
        past position visible.
        """
        attn = self.midlayer.self_attn
        x = self.midlayer.attn_input(embeds, hidden)
        q, k, v = attn.project(x, positions)
        keys, values = (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)) if past is not None else (k, v)
        if attn_mask is None:
            t, s = q.shape[2], keys.shape[2]
            attn_mask = torch.ones(t, s, dtype=torch.bool, device=q.device).tril(s - t)[None, None]
        ctx = F.scaled_dot_product_attention(q, attn.expand_kv(keys), attn.expand_kv(values), attn_mask=attn_mask)
        out = self.midlayer.finish(attn.out(ctx), hidden)
        return DraftStep(self.head(out), out, k, v)

    def unrolled(self, embeds: torch.Tensor, fused: torch.Tensor, positions: torch.Tensor, steps: int
                 ) -> list[torch.Tensor]:
        """Training-time test: the draft run ``steps`` times on its own features, as at decode time.

        Step 0 reads the target's fused features of every position (teacher-forced prefix). Step j >= 1 at start i
        reads the token ``j`` places further (``embeds`` shifted left by j) and its own step-(j-1) hidden state,
        and attends to the step-0 keys of positions <= i plus its own chain's keys of steps 1..j (a diagonal), the
        cache a decode-time draft chain sees. Returns each step's logits [B, T, draft_vocab]; at step j only starts
        i < T - j have an input token (the caller masks the rest).

        Shape: embeds [B, T, H] (embedding of the token each start reads at step 0), fused [B, T, H], positions [B, T].
        """
        attn = self.midlayer.self_attn
        b, t, _ = embeds.shape
        scale = 1.0 / math.sqrt(attn.head_dim)
        causal = torch.ones(t, t, dtype=torch.bool, device=embeds.device).tril()
        hidden = fused
        k0 = v0 = None
        chain_k: list[torch.Tensor] = []
        chain_v: list[torch.Tensor] = []
        outputs = []
        for j in range(steps):
            emb = embeds if j == 0 else F.pad(embeds[:, j:], (0, 0, 0, j))
            x = self.midlayer.attn_input(emb, hidden)
            q, k, v = attn.project(x, positions + j)
            k, v = attn.expand_kv(k), attn.expand_kv(v)
            if j == 0:
                k0, v0 = k, v
                ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=causal[None, None])
            else:
                chain_k.append(k)
                chain_v.append(v)
                prefix = (q @ k0.transpose(-1, -2)) * scale  # [B, h, T, T]
                prefix = prefix.masked_fill(~causal, float("-inf"))
                diag = torch.stack([(q * ck).sum(-1) for ck in chain_k], -1) * scale  # [B, h, T, j]
                weights = torch.softmax(torch.cat([prefix.float(), diag.float()], -1), -1).to(q.dtype)
                ctx = weights[..., :t] @ v0 + sum(weights[..., t + c: t + c + 1] * cv
                                                   for c, cv in enumerate(chain_v))
            hidden = self.midlayer.finish(attn.out(ctx), hidden)
            outputs.append(self.head(hidden))
        return outputs


# -- the vLLM checkpoint ------------------------------------------------------------------------------------------
def vllm_config(spec: Eagle3Spec, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """config.json for vLLM's ``LlamaForCausalLMEagle3`` (plus ``layerexit`` metadata that vLLM ignores)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_parameters": {"rope_theta": spec.rope_theta, "rope_type": "default"},
        "max_position_embeddings": spec.max_position_embeddings,
        "vocab_size": spec.vocab_size,
        "draft_vocab_size": spec.draft_vocab_size,
        "target_hidden_size": spec.target_hidden_size,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": str(dtype).removeprefix("torch."),
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(spec.aux_layers), "use_aux_hidden_state": True},
        "layerexit": {"kind": "eagle3", "spec": spec.to_json()},
    }


def save_eagle3(draft: Eagle3Draft, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``config.json`` + ``model.safetensors`` in vLLM's EAGLE-3 layout, atomically (temp dir, rename)."""
    import shutil

    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {}
    for name, tensor in draft.state_dict().items():
        value = tensor.detach().cpu()
        tensors[name] = value if name in ("d2t", "t2d") else value.to(dtype)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
    (tmp / "config.json").write_text(json.dumps(vllm_config(draft.spec, dtype), indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def is_eagle3_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return ARCHITECTURE in (json.loads(config.read_text()).get("architectures") or [])


def load_eagle3(path: str | Path, embed_tokens: nn.Embedding | None = None,
                dtype: torch.dtype = torch.float32) -> Eagle3Draft:
    """Load a draft written by :func:`save_eagle3` (or any vLLM EAGLE-3 LLaMA checkpoint without embed_tokens)."""
    from safetensors.torch import load_file

    root = Path(path)
    config = json.loads((root / "config.json").read_text())
    meta = (config.get("layerexit") or {}).get("spec")
    if meta is None:
        raise ConfigError(f"{root} is not a layerexit EAGLE-3 draft (no layerexit.spec in config.json)",
                          "export it with `layerexit export-draft`")
    meta = dict(meta)
    meta["aux_layers"] = tuple(meta["aux_layers"])
    draft = Eagle3Draft(Eagle3Spec(**meta), embed_tokens)
    state = load_file(str(root / WEIGHTS_FILE))
    missing, unexpected = draft.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{root}: weights do not match the EAGLE-3 layout (missing {missing}, unexpected "
                          f"{unexpected})", "re-export the draft")
    return draft.to(dtype)


def check_target(spec: Eagle3Spec, target_config: Any, field_name: str = "draft") -> None:
    """A draft trained for another model is refused, naming the field (hidden size, depth, vocabulary)."""
    want = {"hidden_size": spec.target_hidden_size, "num_hidden_layers": spec.target_num_layers,
            "vocab_size": spec.vocab_size}
    have = {k: int(getattr(target_config, k)) for k in want}
    if want != have:
        diff = ", ".join(f"{k} {want[k]} vs {have[k]}" for k in want if want[k] != have[k])
        raise ConfigError(f"{field_name}: the EAGLE-3 draft was trained for another model ({diff})",
                          "train or export a draft for this model")
