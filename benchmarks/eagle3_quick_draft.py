"""A model carrying an EAGLE-3 draft that really accepts, in about a minute: for tests and for benchmarks run before
a trained draft exists. Not a training recipe (that is ``recipe: eagle3``, jobs/configs/smollm2_eagle3.yaml).

    .venv/bin/python benchmarks/eagle3_quick_draft.py --out outputs/quick-eagle3 --prompts PROMPTS.jsonl --seconds 60

The frozen model answers the prompts greedily (fp32); one forward over each prompt + answer gives its hidden states at
the aux layers (vLLM's default (2, N/2, N-3)) and its greedy token at every position; the draft
(``layerexit.models.eagle3.Eagle3Draft``: ``lm_head`` = the model's head rows of a small draft vocabulary, ``norm`` =
its final norm) is trained with training-time test (``Eagle3Draft.unrolled``, ``--num-draft`` steps) on hard targets
(the model's own greedy tokens) over the answer positions, until ``--seconds`` pass or it predicts every target.
It is fitted to the answers it will be asked for again, so its acceptance on those prompts is an upper bound of
what the format and the serving path deliver, not a measure of a draft: say so wherever its figures appear.

The output is the layout the eagle3 recipe registers: the base model's files (weights linked, not copied) +
``eagle3/`` (vLLM's ``LlamaForCausalLMEagle3`` checkpoint, float32) + ``draft_settings.json``
(``{"draft": "eagle3", "num_draft": k}``). Prints one JSON line: training accuracy per draft step, steps, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DEMO_PROMPTS = Path(__file__).resolve().parents[1] / "platform/layerexit/data/resources/demo_prompts.jsonl"


def read_prompts(path: Path, limit: int | None) -> list[str]:
    prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    return prompts[:limit] if limit else prompts


def link_base(src: Path, out: Path) -> None:
    """The base model's files in ``out``: weights as symlinks, everything else copied; subdirectories skipped."""
    out.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir() or item.name.startswith("."):
            continue
        dst = out / item.name
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        if item.suffix in (".safetensors", ".bin"):
            dst.symlink_to(item.resolve())
        else:
            shutil.copy2(item, dst)


@torch.no_grad()
def target_sequences(model, tokenizer, prompts: list[str], max_new_tokens: int, aux_layers) -> list[dict]:
    """Each prompt + the model's greedy answer, with its aux features and greedy token at every position."""
    from layerexit.data.prompts import format_prompt
    from layerexit.models.exits import collect_hidden_states, decoder_parts

    parts = decoder_parts(model)
    L = parts.num_layers
    out = []
    for text in prompts:
        prompt = format_prompt(tokenizer, text)
        ids = torch.tensor([prompt])
        full = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        hidden = collect_hidden_states(model, full, [*aux_layers, L])
        greedy = parts.head(parts.norm(hidden[L][0])).argmax(-1)
        aux = torch.cat([hidden[a][0] for a in aux_layers], dim=-1)
        out.append({"ids": full[0], "aux": aux, "greedy": greedy, "prompt_len": len(prompt)})
    return out


def draft_vocab(seqs: list[dict], size: int, vocab_size: int) -> list[int]:
    """Every token of the sequences and every greedy prediction, filled up to ``size`` with the lowest other ids."""
    used = sorted(set(torch.cat([s["ids"] for s in seqs] + [s["greedy"] for s in seqs]).tolist()))
    if len(used) > size:
        raise SystemExit(f"--draft-vocab {size} is smaller than the {len(used)} distinct tokens to draft")
    taken = set(used)
    fill = (i for i in range(vocab_size) if i not in taken)
    return sorted(used + [next(fill) for _ in range(size - len(used))])


def batch(seqs: list[dict], table: torch.Tensor, steps: int):
    """Right-padded inputs and per-step targets (draft ids, -100 where nothing is trained). Shape: (B, T-1[, ...])."""
    t = max(len(s["ids"]) for s in seqs)
    b, width = len(seqs), seqs[0]["aux"].shape[-1]
    ids = torch.zeros(b, t, dtype=torch.long)
    aux = torch.zeros(b, t, width)
    greedy = torch.full((b, t), -1, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s["ids"])
        ids[i, :n], aux[i, :n], greedy[i, :n] = s["ids"], s["aux"], s["greedy"]
    targets = []
    for j in range(steps):
        # start i reads x_{i+1+j} and is trained on the model's greedy token at position i+1+j (it predicts x_{i+2+j})
        tgt = torch.full((b, t - 1), -100, dtype=torch.long)
        for r, s in enumerate(seqs):
            n = len(s["ids"])
            for i in range(max(0, s["prompt_len"] - 1 - j), n - 1 - j):
                tgt[r, i] = table[greedy[r, i + 1 + j]]
        targets.append(tgt.masked_fill(tgt < 0, -100))
    return ids, aux, targets


def train(model, seqs: list[dict], aux_layers, num_draft: int, vocab: list[int], seconds: float, lr: float,
          max_steps: int, seed: int = 0):
    from layerexit.models.eagle3 import Eagle3Draft, Eagle3Spec
    from layerexit.models.exits import decoder_parts

    parts = decoder_parts(model)
    spec = Eagle3Spec.for_target(model.config, tuple(aux_layers), len(vocab), {"name": "quick-overfit"})
    torch.manual_seed(seed)
    embed = model.get_input_embeddings()
    draft = Eagle3Draft(spec, embed)
    draft.set_vocab(vocab)
    with torch.no_grad():
        draft.lm_head.weight.copy_(parts.head.weight[draft.draft_to_target])
        draft.norm.weight.copy_(parts.norm.weight)
    table = draft.target_to_draft()
    ids, aux, targets = batch(seqs, table, num_draft)
    with torch.no_grad():
        embeds = embed(ids[:, 1:])
    positions = torch.arange(1, ids.shape[1]).expand(ids.shape[0], -1)
    opt = torch.optim.AdamW(draft.parameters(), lr=lr, weight_decay=0.0)
    started, step, acc = time.monotonic(), 0, [0.0] * num_draft
    while time.monotonic() - started < seconds and step < max_steps:
        outs = draft.unrolled(embeds, draft.fuse(aux[:, :-1]), positions, num_draft)
        loss = sum(F.cross_entropy(o.flatten(0, 1), tgt.flatten(), ignore_index=-100) for o, tgt in zip(outs, targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        with torch.no_grad():
            acc = [float((o.argmax(-1) == tgt)[tgt >= 0].float().mean()) for o, tgt in zip(outs, targets)]
        if min(acc) >= 0.999:
            break
    return draft.eval(), {"steps": step, "seconds": round(time.monotonic() - started, 1),
                          "loss": round(float(loss.detach()), 4),
                          "train_accuracy_per_step": [round(a, 4) for a in acc],
                          "positions": int((targets[0] >= 0).sum())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", type=Path, required=True, help="model directory to write (base + eagle3/)")
    parser.add_argument("--prompts", type=Path, default=DEMO_PROMPTS, help="JSONL with a `prompt` field per line")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--num-draft", type=int, default=3, help="draft steps trained and shipped (num_draft)")
    parser.add_argument("--draft-vocab", type=int, default=1024)
    parser.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    parser.add_argument("--max-steps", type=int, default=400, help="training steps at most")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--cache", type=Path, default=None, help="keep the greedy answers and their features here "
                        "(reused when it exists and was made for the same model, prompts and lengths)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from layerexit.models.draft_settings import write_draft_settings
    from layerexit.models.eagle3 import default_aux_layers, save_eagle3
    from layerexit.models.loading import load_model_and_tokenizer, resolve_model

    base = Path(resolve_model(args.model).location)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    model.eval()
    aux_layers = default_aux_layers(model.config.num_hidden_layers)
    t0 = time.monotonic()
    prompts = read_prompts(args.prompts, args.limit)
    key = {"model": str(base), "prompts": prompts, "max_new_tokens": args.max_new_tokens, "aux": list(aux_layers)}
    cached = torch.load(args.cache) if args.cache and args.cache.is_file() else None
    if cached is not None and cached["key"] == key:
        seqs = cached["seqs"]
    else:
        seqs = target_sequences(model, tokenizer, prompts, args.max_new_tokens, aux_layers)
        if args.cache:
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"key": key, "seqs": seqs}, args.cache)
    gen_s = time.monotonic() - t0
    vocab = draft_vocab(seqs, args.draft_vocab, model.config.vocab_size)
    draft, stats = train(model, seqs, aux_layers, args.num_draft, vocab, args.seconds, args.lr, args.max_steps)
    out = args.out.expanduser().resolve()
    link_base(base, out)
    save_eagle3(draft, out / "eagle3", dtype=torch.float32)
    write_draft_settings(out, {"draft": "eagle3", "num_draft": args.num_draft})
    report = {"out": str(out), "base": str(base), "prompts": len(seqs), "aux_layers": list(aux_layers),
              "draft_vocab": len(vocab), "num_draft": args.num_draft, "generate_s": round(gen_s, 1), **stats}
    print(json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
    sys.exit(0)
