"""Which training data makes an EAGLE-3 feature draft accept more per CPU-minute.

Every arm trains a fresh draft (``recipe: eagle3``'s modules: ``Eagle3Draft.unrolled`` training-time test over
``--steps`` steps, soft CE against the frozen SmolLM2's top-k restricted to the draft vocabulary) in this one process
for the same wall-clock budget, on a different mix of data; the data's own cost (generation + the teacher's one
forward pass) is timed once per source. Held-out: the first ``--heldout`` held-out instructions (never trained on)
with the target's greedy answers, acceptance teacher-forced (``eagle3_recipe.draft_acceptance``): conditional
acceptance at draft positions 1..5 and tau (mean accepted length + 1) at k = 1..5.

Sources: ``greedy`` (the model's greedy answers to the 256 training instructions), ``sampled`` (3 more sampled
answers each), ``magpie`` (requests the chat model writes after its user header, with its greedy answers),
``text`` (installed packages' READMEs + pydoc topics, plain text). Generated data is cached
($LAYEREXIT_HOME/data), so the training job reuses it.

Run:  DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/eagle3_data_mix.py \
          --arms greedy greedy+sampled greedy+magpie text greedy+sampled+magpie+text --seconds 240 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def timed(fn):
    """(result, wall seconds); the process's CPU seconds of the last call are in ``LAST_CPU[0]`` (the machine is
    shared: CPU time is what the data cost, wall time includes waiting for other jobs)."""
    t0, c0 = time.time(), time.process_time()
    out = fn()
    LAST_CPU[0] = time.process_time() - c0
    return out, time.time() - t0


LAST_CPU = [0.0]


def combine(caches_and_examples):
    """Concatenate per-source caches (positions='all') and their examples into one (rows stay contiguous)."""
    from layerexit.data.teacher_cache import TeacherCache

    examples, ids, logp, seq, pos, hidden = [], [], [], [], [], {}
    for cache, exs in caches_and_examples:
        seq.append(cache.seq + len(examples))
        examples.extend(exs)
        ids.append(cache.ids)
        logp.append(cache.logp)
        pos.append(cache.pos)
        for layer, h in cache.hidden.items():
            hidden.setdefault(layer, []).append(h)
    return TeacherCache(torch.cat(ids), torch.cat(logp), torch.cat(seq), torch.cat(pos),
                        {l: torch.cat(v) for l, v in hidden.items()}), examples


def cost_probe(args) -> None:
    """CPU seconds (this process) per trained token of each source, on ``--cost-probe`` items not generated before
    (held-out instructions past ``--heldout`` for greedy answers, seed 1 for sampled answers and Magpie prompts),
    each followed by the teacher's one forward pass (positions='all', a temporary cache directory)."""
    import tempfile

    from layerexit.data.datasets import finish_example
    from layerexit.data.instructions import interleave_categories, load_instructions, split_instructions
    from layerexit.data.magpie import magpie_prompts
    from layerexit.data.selfdistill import sample_responses, self_distill
    from layerexit.data.teacher_cache import build_teacher_cache
    from layerexit.data.text_corpus import package_text_examples
    from layerexit.data.instructions import Instruction
    from layerexit.machine import machine_line
    from layerexit.models.eagle3 import default_aux_layers
    from layerexit.models.loading import load_model_and_tokenizer

    n = args.cost_probe
    print(f"machine: {machine_line()}", flush=True)
    model, tok = load_model_and_tokenizer(args.model, dtype=torch.float32)
    aux = list(default_aux_layers(model.config.num_hidden_layers))
    train_items, held_items = split_instructions(load_instructions())
    train_items, held_items = interleave_categories(train_items), interleave_categories(held_items)

    def examples(rows):
        out = [finish_example([*r.prompt_ids, *r.response_ids], [-100] * len(r.prompt_ids) + list(r.response_ids),
                              len(r.prompt_ids), args.max_length) for r in rows]
        return [e for e in out if e is not None]

    def trained(exs):
        return sum(sum(1 for y in e.labels[1:] if y != -100) for e in exs)

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        (r, _), _ = timed(lambda: self_distill(args.model, held_items[args.heldout: args.heldout + n],
                                               args.max_new_tokens, model_and_tokenizer=(model, tok),
                                               show_progress=False))
        rows["greedy"] = (examples(r), LAST_CPU[0])
        (r, _), _ = timed(lambda: sample_responses(args.model, train_items[:n], 1, max_new_tokens=args.max_new_tokens,
                                                   seed=1, show_progress=False))
        rows["sampled"] = (examples(r), LAST_CPU[0])
        (prompts, _), _ = timed(lambda: magpie_prompts(args.model, n, seed=1, show_progress=False))
        cpu = LAST_CPU[0]
        items = [Instruction(f"magpie-probe-{i}", "magpie", p) for i, p in enumerate(prompts)]
        (r, _), _ = timed(lambda: self_distill(args.model, items, args.max_new_tokens,
                                               model_and_tokenizer=(model, tok), show_progress=False))
        rows["magpie"] = (examples(r), cpu + LAST_CPU[0])
        (exs, _), _ = timed(lambda: package_text_examples(tok, n * 100, args.max_length))
        rows["text"] = (exs, LAST_CPU[0])
        print("| source | items | trained tokens | generation CPU s | teacher CPU s (positions) | CPU s per 1k trained tokens |")
        print("|---|---|---|---|---|---|")
        for name, (exs, gen_cpu) in rows.items():
            _, _ = timed(lambda exs=exs, name=name: build_teacher_cache(
                args.model, exs, k=args.top_k, layers=aux, directory=f"{tmp}/{name}",
                model_and_tokenizer=(model, tok), positions="all"))
            teach = LAST_CPU[0]
            tokens = trained(exs)
            positions = sum(len(e.input_ids) for e in exs)
            print(f"| {name} | {len(exs)} | {tokens} | {gen_cpu:.1f} | {teach:.1f} ({positions}) | "
                  f"{1000 * (gen_cpu + teach) / max(tokens, 1):.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--arms", nargs="+", default=["greedy", "greedy+sampled", "greedy+magpie", "text",
                                                  "greedy+sampled+magpie+text"])
    ap.add_argument("--seconds", type=float, default=240.0, help="training wall-clock per arm")
    ap.add_argument("--arm-steps", type=int, default=0,
                    help="train every arm for this many steps instead (equal compute whatever the machine's load)")
    ap.add_argument("--eval-steps", type=int, default=0, help="with --arm-steps: also evaluate every N steps")
    ap.add_argument("--eval-every", type=float, default=0.0, help="also evaluate every N seconds (0: end only)")
    ap.add_argument("--heldout", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--magpie", type=int, default=256)
    ap.add_argument("--text-tokens", type=int, default=300_000)
    ap.add_argument("--steps", type=int, default=4, help="training-time-test steps")
    ap.add_argument("--decay", type=float, default=0.8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cost-probe", type=int, default=0,
                    help="only measure each source's CPU seconds per trained token on N fresh items, then exit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.cost_probe:
        cost_probe(args)
        return

    from layerexit.data.datasets import finish_example
    from layerexit.data.instructions import interleave_categories, load_instructions, split_instructions
    from layerexit.data.selfdistill import sample_responses, self_distill
    from layerexit.data.teacher_cache import build_teacher_cache
    from layerexit.machine import machine_line
    from layerexit.models.eagle3 import default_aux_layers
    from layerexit.models.loading import load_model_and_tokenizer
    from layerexit.training import eagle3_recipe as er

    print(f"machine: {machine_line()}", flush=True)
    model, tok = load_model_and_tokenizer(args.model, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    aux = list(default_aux_layers(model.config.num_hidden_layers))
    train_items, held_items = split_instructions(load_instructions())
    train_items, held_items = interleave_categories(train_items), interleave_categories(held_items)

    def to_examples(rows):
        out = []
        for r in rows:
            ex = finish_example([*r.prompt_ids, *r.response_ids], [-100] * len(r.prompt_ids) + list(r.response_ids),
                                len(r.prompt_ids), args.max_length)
            if ex is not None:
                out.append(ex)
        return out

    cost: dict[str, dict] = {}
    (held_rows, _), s = timed(lambda: self_distill(args.model, held_items[: args.heldout], args.max_new_tokens,
                                                   model_and_tokenizer=(model, tok), show_progress=False))
    heldout = er.heldout_features(model, to_examples(held_rows), aux)
    print(f"held-out: {len(heldout)} sequences ({s:.0f} s to answer)", flush=True)

    needed = {src for arm in args.arms for src in arm.split("+")}
    sources: dict[str, list] = {}
    if "greedy" in needed or "sampled" in needed:
        (rows, _), s = timed(lambda: self_distill(args.model, train_items, args.max_new_tokens,
                                                  model_and_tokenizer=(model, tok), show_progress=False))
        sources["greedy"] = to_examples(rows)
        cost["greedy"] = {"generate_s": s, "generate_cpu_s": LAST_CPU[0]}
    if "sampled" in needed:
        (rows, _), s = timed(lambda: sample_responses(args.model, train_items, args.samples,
                                                      max_new_tokens=args.max_new_tokens, show_progress=False))
        sources["sampled"] = to_examples(rows)
        cost["sampled"] = {"generate_s": s, "generate_cpu_s": LAST_CPU[0]}
    if "magpie" in needed:
        from layerexit.data.magpie import magpie_examples

        (exs, meta), s = timed(lambda: magpie_examples(args.model, args.magpie, args.max_new_tokens,
                                                       args.max_length, show_progress=False))
        sources["magpie"] = exs
        cost["magpie"] = {"generate_s": s, "generate_cpu_s": LAST_CPU[0], **meta}
    if "text" in needed:
        from layerexit.data.text_corpus import package_text_examples

        (exs, meta), s = timed(lambda: package_text_examples(tok, args.text_tokens, args.max_length))
        sources["text"] = exs
        cost["text"] = {"generate_s": s, "generate_cpu_s": LAST_CPU[0], **meta}
    caches = {}
    for name, exs in sources.items():
        cache, s = timed(lambda exs=exs: build_teacher_cache(args.model, exs, k=args.top_k, layers=aux,
                                                             model_and_tokenizer=(model, tok), positions="all"))
        caches[name] = cache
        cost[name].update({"teacher_s": cache.meta.get("build_s", s), "teacher_cpu_s": LAST_CPU[0], "examples": len(exs),
                           "positions": cache.num_positions,
                           "trained_positions": sum(sum(1 for y in e.labels[1:] if y != -100) for e in exs)})
        print(f"source {name}: {cost[name]}", flush=True)

    answers = [e for n in ("greedy", "sampled", "magpie") if n in sources for e in sources[n]]
    vocab = er.draft_vocabulary(answers or sources[next(iter(sources))], args.vocab, model.config.vocab_size)
    print(f"draft vocabulary: {len(vocab)} ids", flush=True)
    results = {"machine": machine_line(), "args": vars(args), "sources": cost, "arms": {}}
    for arm in args.arms:
        cache, examples = combine([(caches[s], sources[s]) for s in arm.split("+")])
        rows = er.sequence_rows(cache, len(examples))
        draft = er.new_draft(model, aux, vocab, seed=0)
        objective = er.Eagle3Objective(model, draft, args.steps, args.decay)
        opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=args.lr)
        before = er.draft_acceptance(draft, heldout, 5)
        curve = [{"s": 0, "step": 0, **before.metrics("")}]
        g = torch.Generator().manual_seed(0)
        step, t0, next_eval, losses = 0, time.time(), args.eval_every or float("inf"), []
        train_s = 0.0
        cpu0 = time.process_time()

        def done() -> bool:
            return step >= args.arm_steps if args.arm_steps else train_s >= args.seconds

        def eval_due() -> bool:
            return (step % args.eval_steps == 0) if args.arm_steps and args.eval_steps else train_s >= next_eval

        while not done():
            order = torch.randperm(len(examples), generator=g).tolist()
            for b in range(0, len(order) - args.batch + 1, args.batch):
                idx = order[b : b + args.batch]
                chunk = [examples[i] for i in idx]
                width = max(len(e.input_ids) for e in chunk)
                batch = er.eagle3_batch(chunk, [rows[i] for i in idx], cache, aux, width, tok.pad_token_id)
                ts = time.time()
                warm = min(1.0, (step + 1) / 20)
                for group in opt.param_groups:
                    group["lr"] = args.lr * warm
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = objective(**batch)
                out["loss"].backward()
                torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                train_s += time.time() - ts
                step += 1
                losses.append(float(out["loss"].detach()))
                if eval_due() and not done():
                    acc = er.draft_acceptance(draft, heldout, 5)
                    curve.append({"s": round(train_s), "step": step, **acc.metrics("")})
                    print(f"  {arm} {train_s:.0f}s step {step}: acc@1 {acc.per_position[0]:.3f} tau@4 "
                          f"{acc.tau[4]:.2f} loss {sum(losses[-20:]) / len(losses[-20:]):.3f}", flush=True)
                    next_eval += args.eval_every or float("inf")
                if done():
                    break
        acc = er.draft_acceptance(draft, heldout, 5)
        curve.append({"s": round(train_s), "step": step, **acc.metrics("")})
        data_s = sum(cost[s]["generate_s"] + cost[s]["teacher_s"] for s in arm.split("+"))
        data_cpu_s = sum(cost[s].get("generate_cpu_s", 0) + cost[s].get("teacher_cpu_s", 0) for s in arm.split("+"))
        results["arms"][arm] = {"steps": step, "train_s": round(train_s, 1), "wall_s": round(time.time() - t0, 1),
                                "train_cpu_s": round(time.process_time() - cpu0, 1),
                                "data_s": round(data_s, 1), "data_cpu_s": round(data_cpu_s, 1),
                                "examples": len(examples),
                                "positions": cache.num_positions, "epochs": round(step * args.batch / len(examples), 2),
                                "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
                                "acceptance": acc.to_dict(), "curve": curve}
        print(f"ARM {arm}: {step} steps ({results['arms'][arm]['epochs']} epochs) in {train_s:.0f} s, data "
              f"{data_s:.0f} s; acceptance by position " + " ".join(f"{a:.3f}" for a in acc.per_position)
              + "; tau " + " ".join(f"k{k}={t:.2f}" for k, t in acc.tau.items()), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=2)
    print("\n| arm | data cost (s) | examples | positions | steps (epochs) | acceptance pos 1..5 | tau k=2/3/4/5 |")
    print("|---|---|---|---|---|---|---|")
    for arm, r in results["arms"].items():
        a = r["acceptance"]
        print(f"| {arm} | {r['data_s']:.0f} | {r['examples']} | {r['positions']} | {r['steps']} ({r['epochs']}) | "
              + " / ".join(f"{x:.2f}" for x in a["per_position"]) + " | "
              + " / ".join(f"{a['tau'][str(k)]:.2f}" for k in (2, 3, 4, 5)) + " |")


if __name__ == "__main__":
    main()
