"""What moves the adapters recipe: train exit adapters in one process on the job's teacher cache for a fixed
wall-clock budget per setting, then measure agreement with the final layer on held-out prompts and calibration
(Figure 6: confidence vs agreement) for every setting in the same run.

Run:  .venv/bin/python benchmarks/recipes_adapters_sweep.py --config jobs/configs/smollm2_adapters.yaml \
          --seconds 180 --settings full_every=1 full_every=8 full_every=0 --png docs/figures/adapters_calibration.png

Each ``--settings`` item is a comma-separated list of overrides of the distill/adapters/optim settings
(``full_every``, ``top_k`` is fixed by the cache, ``temperature``, ``rank``, ``lr``, ``positions``). The held-out
set is the config's alignment prompts (the held-out 20% of the instruction set, as `layerexit heldout-prompts`),
answered greedily by the base model; agreement is teacher-forced on those answers, exactly like the training job's
``align/l<l>`` metric. Calibration: expected calibration error (ECE, 10 bins) between an exit's top-1 probability
and whether it agrees with the final layer; lower is better.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def heldout_states(model, tok, prompts, layers, max_new_tokens):
    """Base-model greedy answers to the held-out prompts; exit hidden states and the final layer's top-1 there."""
    from layerexit.engine.reference import eos_ids, hf_greedy_generate_batched
    from layerexit.models.exits import collect_hidden_states, decoder_parts

    parts = decoder_parts(model)
    L = parts.num_layers
    answers = hf_greedy_generate_batched(model, prompts, max_new_tokens, tok.pad_token_id, 8, eos_ids(model, tok),
                                         show_progress=False)
    hidden = {l: [] for l in layers}
    final = []
    with torch.no_grad():
        for p, a in zip(prompts, answers, strict=True):
            if not a:
                continue
            seq = torch.tensor([[*p, *a]])
            hs = collect_hidden_states(model, seq, [*layers, L])
            sl = slice(len(p) - 1, len(p) + len(a) - 1)
            final.append(parts.head(parts.norm(hs[L][0, sl])).argmax(-1))
            for l in layers:
                hidden[l].append(hs[l][0, sl])
    return {l: torch.cat(v) for l, v in hidden.items()}, torch.cat(final)


def oracle_ratio(agree_by_layer: dict[int, torch.Tensor], config, adapter_rank: int | None) -> float:
    """FLOPs/token if every token stopped at the earliest exit that agrees with the final layer (layers up to it,
    its adapter, one head), over the full model's FLOPs/token (all layers, one head). Attention's context term is
    left out (short answers); it bounds what any exit policy can save."""
    h, inter, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    kv = h * config.num_key_value_heads // config.num_attention_heads
    layer = 2 * (2 * h * h + 2 * h * kv + 3 * h * inter)
    head = 2 * h * V
    adapter = 4 * h * adapter_rank if adapter_rank else 0
    layers = sorted(agree_by_layer)
    n = len(next(iter(agree_by_layer.values())))
    cost = torch.full((n,), float(L * layer + head))
    done = torch.zeros(n, dtype=torch.bool)
    for l in layers:
        hit = agree_by_layer[l].bool() & ~done
        cost[hit] = l * layer + adapter + head
        done |= hit
    return float(cost.mean() / (L * layer + head))


@torch.no_grad()
def evaluate(parts, adapters, hidden, final, bins=10) -> dict:
    out = {}
    for l, h in hidden.items():
        x = adapters[l](h) if adapters else h
        probs = parts.head(parts.norm(x)).float().softmax(-1)
        conf, top = probs.max(-1)
        agree = (top == final).float()
        idx = (conf * bins).long().clamp(max=bins - 1)
        ece, counts, accs = 0.0, [], []
        for b in range(bins):
            sel = idx == b
            n = int(sel.sum())
            counts.append(n)
            accs.append(float(agree[sel].mean()) if n else None)
            if n:
                ece += n / len(agree) * abs(float(agree[sel].mean()) - float(conf[sel].mean()))
        out[l] = {"agreement": float(agree.mean()), "confidence": float(conf.mean()), "ece": ece,
                  "bin_counts": counts, "bin_alignment": accs, "agree_tokens": agree}
    rank = next(iter(adapters.values())).rank if adapters else None
    oracle = oracle_ratio({l: v["agree_tokens"] for l, v in out.items()}, parts.config, rank)
    for v in out.values():
        v.pop("agree_tokens")
    out["oracle_flops_ratio"] = oracle
    return out


@torch.no_grad()
def train_agreement(parts, adapters, cache, layers, n: int = 2048, seed: int = 1) -> dict[int, float]:
    """Agreement on cached *training* positions (exit argmax vs the teacher's top-1): beside the held-out figure it
    tells whether a setting is short of data (train >> held-out) or of capacity/steps (both low)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(cache.num_positions, generator=g)[:n]
    target = cache.ids[idx, 0].long()
    out = {}
    for l in layers:
        h = cache.hidden[l][idx].float()
        x = adapters[l](h) if adapters else h
        out[l] = float((parts.head(parts.norm(x)).argmax(-1) == target).float().mean())
    return out


def train(model, cache, layers, setting: dict, seconds: float, seed: int = 0) -> tuple[dict, int]:
    from layerexit.models.adapters import build_adapters
    from layerexit.training.recipes import AdapterObjective, cache_epoch_batches

    torch.manual_seed(seed)
    adapters = build_adapters(layers, model.config.hidden_size, int(setting["rank"]))
    obj = AdapterObjective(model, adapters, {l: 1.0 for l in layers}, float(setting["temperature"]),
                           int(setting["full_every"]), 512)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=float(setting["lr"]))
    t0, steps, epoch = time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < seconds:
        for batch in cache_epoch_batches(cache, layers, positions=int(setting["positions"]), world=1, rank=0,
                                         grad_accum=1, epoch=epoch, seed=seed):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = obj(**batch)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(obj.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
            if time.perf_counter() - t0 >= seconds:
                break
        epoch += 1
    return {l: a.eval() for l, a in adapters.items()}, steps


def evaluate_model(args) -> int:
    """Agreement, ECE and the oracle ceiling of a trained model's exits (its adapters attached by the loader)."""
    from layerexit.models.exits import decoder_parts
    from layerexit.models.loading import load_model_and_tokenizer
    from layerexit.training import load_train_config
    from layerexit.training.ray_trainer import prepare_training_data

    cfg = load_train_config(args.config)
    cfg.data.samples_per_instruction = 0
    data = prepare_training_data(cfg, show_progress=False)
    layers = sorted(cfg.lite.exit_layers)
    model, tok = load_model_and_tokenizer(args.evaluate_model)
    parts = decoder_parts(model)
    hidden, final = heldout_states(model, tok, data.eval_prompts[: cfg.eval.alignment_prompts], layers,
                                   cfg.eval.alignment_max_new_tokens)
    rows = {"no adapters": evaluate(parts, None, hidden, final)}
    if parts.adapters:
        rows["with its adapters"] = evaluate(parts, dict(parts.adapters), hidden, final)
    print(f"{args.evaluate_model}: adapters at {sorted(parts.adapters)}; {len(final)} held-out tokens")
    print("| exits | " + " | ".join(f"l{l}" for l in layers) + " | mean ECE | oracle FLOPs/token |")
    print("|---|" + "---|" * (len(layers) + 2))
    for name, ev in rows.items():
        print(f"| {name} | " + " | ".join(f"{ev[l]['agreement']:.0%}" for l in layers)
              + f" | {sum(ev[l]['ece'] for l in layers) / len(layers):.3f} | {ev['oracle_flops_ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1, default=str)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/configs/smollm2_adapters.yaml")
    parser.add_argument("--seconds", type=float, default=180.0, help="training wall-clock budget per setting")
    parser.add_argument("--settings", nargs="+", default=["full_every=8"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--png", help="write Figure 5/6 for every setting here")
    parser.add_argument("--json")
    parser.add_argument("--evaluate-model", help="only evaluate this model spec (e.g. models:/layerexit-smollm2_adapters"
                                                 "@trained, loaded with its shipped adapters) against the base model's "
                                                 "held-out answers; no cache, no training")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.evaluate_model:
        return evaluate_model(args)
    from layerexit.evaluation.alignment import AlignmentReport, LayerAlignment, plot_alignment
    from layerexit.models.exits import decoder_parts
    from layerexit.models.loading import load_model_and_tokenizer
    from layerexit.training import load_train_config
    from layerexit.training.ray_trainer import prepare_training_data
    from layerexit.training.recipes import add_sampled_examples, prepare_teacher

    cfg = load_train_config(args.config)
    data = prepare_training_data(cfg, show_progress=False)
    add_sampled_examples(cfg, data, show_progress=False)
    cache = prepare_teacher(cfg, data)
    layers = sorted(cfg.lite.exit_layers)
    model, tok = load_model_and_tokenizer(cfg.model.spec)
    parts = decoder_parts(model)
    hidden, final = heldout_states(model, tok, data.eval_prompts[: cfg.eval.alignment_prompts], layers,
                                   cfg.eval.alignment_max_new_tokens)
    print(f"cache: {cache.num_positions} positions, k={cache.k}, {cache.meta['size_bytes'] / 2**20:.0f} MiB, "
          f"built in {cache.meta['build_s']:.0f} s; held-out: {len(final)} tokens", flush=True)
    defaults = {"full_every": cfg.distill.full_every, "temperature": cfg.distill.temperature,
                "rank": cfg.adapters.rank, "lr": cfg.optim.lr, "positions": 2 * cfg.adapters.positions_per_batch}
    results = {"base (no adapters)": {"steps": 0, "eval": evaluate(parts, None, hidden, final),
                                      "train": train_agreement(parts, None, cache, layers)}}
    for item in args.settings:
        setting = dict(defaults)
        for kv in item.split(","):
            key, _, value = kv.partition("=")
            setting[key] = float(value) if "." in value or "e" in value else int(value)
        adapters, steps = train(model, cache, layers, setting, args.seconds)
        results[item] = {"steps": steps, "setting": setting, "eval": evaluate(parts, adapters, hidden, final),
                         "train": train_agreement(parts, adapters, cache, layers)}
        print(f"{item}: {steps} steps", flush=True)
    print(f"\n{args.seconds:.0f} s of training per setting, {args.threads} threads (shared machine)")
    print("| setting | steps | " + " | ".join(f"l{l} agree" for l in layers) + " | mean ECE | oracle FLOPs/token | train-position agreement |")
    print("|---|---|" + "---|" * (len(layers) + 3))
    for name, r in results.items():
        ev = r["eval"]
        print(f"| {name} | {r['steps']} | " + " | ".join(f"{ev[l]['agreement']:.0%}" for l in layers)
              + f" | {sum(ev[l]['ece'] for l in layers) / len(layers):.3f} | {ev['oracle_flops_ratio']:.2f} | "
              + "/".join(f"{r['train'][l]:.0%}" for l in layers) + " |")
    if args.png:
        reports = {}
        for name, r in results.items():
            rows = [LayerAlignment(l, v["agreement"], v["confidence"], len(final), v["bin_counts"], v["bin_alignment"])
                    for l, v in r["eval"].items() if isinstance(l, int)]
            reports[name] = AlignmentReport(parts.num_layers, len(data.eval_prompts), len(final),
                                            [i / 10 for i in range(11)], rows)
        plot_alignment(reports, args.png, highlight_layers=[l for l in layers if l in (8, 16, 24)])
        print(f"figure: {args.png}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
