"""Throughput and FLOPs of exit configurations against transformers' cached ``generate``, in one process.

Every configuration decodes the same prompts with the same batch size; ratios are taken against the
baseline measured in the same run, because shared machines are noisy. Besides the engine's configurations the
rows are what a user could run instead, and what no decoder can beat:

- ``hf-generate``: transformers' eager ``generate`` with its dynamic KV cache (the baseline of every ratio);
- ``hf-generate-static-compiled`` (with ``compile``): transformers' own static cache with the model's forward
  ``torch.compile``d, as its docs describe (``cache_implementation="static"``, ``model.forward =
  torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)``), warmed up before timing;
- ``hf-prompt-lookup``, ``hf-assisted-early-exit``, ``hf-assisted-draft``: transformers' assisted generation with
  n-gram drafts, with its own first L layers as the draft (``assistant_early_exit=L``) and with a draft model
  (``assistant_model=``, e.g. ``layerexit export-draft``'s directory); batch 1 only in transformers, so these rows
  decode a batch's prompts one at a time;
- ``weights loop (eager F.linear)``: an eager Python loop of one ``F.linear`` per weight matrix for one token
  (dispatch included): what the matrix-vector products alone cost through PyTorch's eager ops, not a hardware bound;
- ``floor (memory bandwidth)``: the weight bytes one batch-1 decode step reads (every parameter once in the run's
  dtype; of the embedding table one row) over this machine's memory bandwidth, measured in the same run (best of
  several timed reads of a large tensor). No batch-1 decoder that reads its weights from memory beats it;
- ``replay (free perfect draft) k=K`` (with any self-speculative configuration): the final layer's own answer replayed
  as the draft, k tokens per verification (acceptance 1, draft cost 0): the decode loop's own ceiling for that k, on
  the compiled engine with ``compile``. In bfloat16 a verification of k+1 columns can flip a near-tie that the
  one-column step did not (rounding differs with the shape), and a replayed answer that diverged once is rejected
  from there on; so the answer replayed is the loop's own fixed point (``replay_answers``: `final`'s answer replayed,
  its output replayed, ... until it replays itself, untimed, at most ``REPLAY_ROUNDS`` times). In float32 it is
  `final`'s answer at the first round.

Self-speculative rows carry the acceptance at each draft position (steps that accepted draft i over steps that
drafted it), tau (tokens per verification step) and their tokens/s over ``final``'s on the same engine.

Compiled rows decode warm-up batches first (the batch size, one row and two rows, every configuration and k), so every
graph the timed run meets is compiled before timing; their wall time is the row's ``compile_seconds``. A graph
compiled during the timed run anyway is reported apart (``timed_compile_seconds``, a warning), never hidden.

Every row carries ``describe_machine()`` (CPU model, ISA flags, torch's CPU capability, threads): figures from
different CPUs differ 2-4x and are compared only within one run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from layerexit.engine.decode import EarlyExitEngine, SequenceResult
from layerexit.engine.flops import FlopsModel
from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.engine.reference import hf_greedy_generate
from layerexit.machine import describe_machine

logger = logging.getLogger(__name__)

BASELINE = "hf-generate"
HF_STATIC_COMPILED = "hf-generate-static-compiled"
LOOP = "weights loop (eager F.linear)"
FLOOR = "floor (memory bandwidth)"
PROMPT_LOOKUP = "hf-prompt-lookup"
ASSISTED_EARLY_EXIT = "hf-assisted-early-exit"
ASSISTED_DRAFT = "hf-assisted-draft"
PROMPT_LOOKUP_TOKENS = 10  # transformers' documented setting, and what the issue measured
COMPILED = " +compile"  # suffix of the rows decoded by the compiled engine (``compile=True``)
REPLAY = "replay (free perfect draft)"
REPLAY_KS = (1, 2, 3, 4, 5)  # the replay rows' k, by default
WARM_TOKENS = 16  # tokens per warm-up decode: every shape is met within a few steps
REPLAY_ROUNDS = 4  # at most this many untimed runs to find the answer a replayed draft reproduces
BANDWIDTH_BYTES = 1 << 30  # the tensor the bandwidth is read from: larger than any cache the weights could sit in


def weights_loop_tokens_per_s(model, repeats: int = 30) -> float:
    """Tokens/s of an eager Python loop doing one matrix-vector product per weight matrix (every decoder projection
    and the LM head, for one token) through ``F.linear``, dispatch included. It says what the products alone cost
    through eager PyTorch on this machine; it is not the memory-bound limit (that is ``floor_tokens_per_s``)."""
    import torch
    from torch import nn

    mats = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    dtype = mats[0].dtype
    xs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype, device=w.device) for w in mats}
    with torch.inference_mode():
        for w in mats:  # warm-up
            torch.nn.functional.linear(xs[w.shape[1]], w)
        sync = torch.cuda.synchronize if mats[0].is_cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            for w in mats:
                torch.nn.functional.linear(xs[w.shape[1]], w)
        sync()
        return repeats / (time.perf_counter() - t0)


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one batch-1 decode step reads, in the model's dtype: every parameter once (a tied LM head
    reads the whole embedding matrix), of the input embedding table only the token's row."""
    params = list(model.parameters())  # tied tensors appear once
    total = sum(p.numel() * p.element_size() for p in params)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is emb
    emb_bytes = emb.numel() * emb.element_size()
    row_bytes = emb.shape[1] * emb.element_size()
    return total - emb_bytes + row_bytes + (emb_bytes if tied else 0)


class BandwidthProbe:
    """This machine's memory read bandwidth in GB/s (1e9 bytes/s), STREAM-style: timed full reads (a sum) of one
    ``nbytes`` float32 tensor, on the current torch threads (or on the GPU ``device``). The tensor is allocated and
    written once (its pages touched) and read at every ``measure``; ``best`` is the fastest read so far."""

    def __init__(self, nbytes: int = BANDWIDTH_BYTES, device=None) -> None:
        import torch

        self.device = torch.device(device or "cpu")
        self.buf = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=self.device)
        self.best = 0.0

    def measure(self, repeats: int = 5) -> float:
        import torch

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        with torch.inference_mode():
            self.buf.sum()
            for _ in range(repeats):
                sync()
                t0 = time.perf_counter()
                self.buf.sum()
                sync()
                self.best = max(self.best, self.buf.numel() * 4 / (time.perf_counter() - t0) / 1e9)
        return self.best


def memory_bandwidth_gbs(nbytes: int = BANDWIDTH_BYTES, repeats: int = 5, device=None) -> float:
    """The best of ``repeats`` timed reads of an ``nbytes`` tensor (``BandwidthProbe``), in GB/s."""
    return BandwidthProbe(nbytes, device).measure(repeats)


@dataclass
class BenchRow:
    name: str
    tokens: int
    seconds: float
    tokens_per_s: float
    flops_per_token: float | None  # None: not counted (transformers' assisted generation)
    speedup: float = 1.0  # tokens/s relative to transformers generate
    flops_ratio: float | None = 1.0  # FLOPs/token relative to transformers generate
    agreement: float | None = None  # share of positions equal to `final`'s tokens
    identical: float | None = None  # share of sequences identical to `final`'s
    mean_exit_layer: float | None = None
    similarity: float | None = None  # mean spaCy similarity of decoded text to `final`'s (bench --similarity)
    similarity_minilm: float | None = None  # mean MiniLM cosine of decoded text to `final`'s (bench --similarity)
    compile_seconds: float | None = None  # compiled rows: wall time of the warm-up calls that compiled a graph
    timed_compile_seconds: float | None = None  # compiled rows: compilation met inside the timed run (0: none)
    acceptance: list[float] | None = None  # self-speculative: acceptance at draft position 1, 2, ...
    tau: float | None = None  # self-speculative: tokens per verification step (accepted drafts + 1)
    vs_final: float | None = None  # tokens/s over `final`'s on the same engine (compiled or eager) in this run
    bytes_per_token: int | None = None  # floor: weight bytes one decode step reads
    bandwidth_gbs: float | None = None  # floor: memory bandwidth measured in this run
    dtype: str = ""  # the weights' dtype in this run
    machine: dict = field(default_factory=dict)  # describe_machine() of the run

    def to_dict(self) -> dict:
        return asdict(self)


def token_agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> tuple[float, float]:
    """Position-wise agreement over the longer of each pair, and the share of identical sequences."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        n = max(len(x), len(y))
        same += sum(1 for i in range(min(len(x), len(y))) if x[i] == y[i])
        total += n
    identical = sum(1 for x, y in zip(a, b, strict=True) if list(x) == list(y)) / max(1, len(a))
    return (same / total if total else 1.0), identical


def _batches(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def replay_name(k: int, compiled: bool) -> str:
    return f"{REPLAY} k={k}" + (COMPILED if compiled else "")


def replay_answers(engine: EarlyExitEngine, prompts, cfg: ExitConfig, sampling: SamplingParams,
                   answers: list[list[int]], rounds: int = REPLAY_ROUNDS) -> list[list[int]]:
    """The answers the replay configuration ``cfg`` reproduces when they are its draft: ``answers`` (`final`'s)
    replayed, then the output replayed, until it is a fixed point or ``rounds`` runs were made."""
    for _ in range(rounds):
        out = [r.token_ids for r in engine.generate(prompts, cfg, sampling, replay=answers)]
        if out == answers:
            break
        answers = out
    return answers


def draft_stats(results: Sequence[SequenceResult]) -> tuple[list[float] | None, float | None]:
    """Acceptance at each draft position (accepted / drafted at that position) and tau (tokens per verification
    step) over the sequences of a self-speculative run; (None, None) when nothing was drafted."""
    width = max((len(r.drafted_at) for r in results), default=0)
    if width == 0:
        return None, None
    drafted = [sum(r.drafted_at[i] for r in results if i < len(r.drafted_at)) for i in range(width)]
    accepted = [sum(r.accepted_at[i] for r in results if i < len(r.accepted_at)) for i in range(width)]
    acceptance = [a / d for a, d in zip(accepted, drafted) if d]
    return acceptance, (drafted[0] + sum(accepted)) / drafted[0]


class HfStaticCompiled:
    """transformers' static KV cache with the model's forward compiled, as transformers' docs describe it
    ("Static kv-cache and torch.compile"): ``cache_implementation="static"`` and ``torch.compile(model.forward,
    mode="reduce-overhead", fullgraph=True)`` (on a CPU inductor skips the CUDA graphs of that mode). The compiled
    forward is put on the model only for this row's calls, so the other rows run the eager model."""

    COMPILE = {"mode": "reduce-overhead", "fullgraph": True}  # transformers' documented torch.compile arguments

    def __init__(self, model) -> None:
        import torch

        self.model = model
        self.forward = torch.compile(model.forward, **self.COMPILE)

    def generate(self, prompts, max_new_tokens: int, pad_id: int, eos: set[int]) -> list[list[int]]:
        self.model.forward = self.forward
        try:
            return hf_greedy_generate(self.model, prompts, max_new_tokens, pad_id, eos, cache_implementation="static")
        finally:
            del self.model.forward


def _one_at_a_time(generate):
    """transformers' assisted generation takes batch 1 only: decode a batch's prompts one after another."""
    def run(prompts, *args, **kwargs):
        return [out for p in prompts for out in generate([p], *args, **kwargs)]
    return run


def run_bench(model, prompt_ids: Sequence[Sequence[int]], configs: dict[str, ExitConfig], eos: set[int],
              pad_id: int, max_new_tokens: int = 64, batch_size: int = 1, show_progress: bool = True,
              floor: bool = True, compile: bool = False, hf_compiled: bool | None = None,
              assistant_early_exit: int | None = None, assistant_model=None,
              bandwidth_bytes: int = BANDWIDTH_BYTES, replay_ks: Sequence[int] | None = None
              ) -> tuple[list[BenchRow], dict[str, list[SequenceResult]]]:
    """Benchmark transformers generate (greedy, KV cache) and each named configuration on the same prompts.

    Adds the weights loop and the bandwidth floor (``floor``); transformers' prompt-lookup decoding
    (``hf-prompt-lookup``) when a configuration drafts from n-grams; transformers' compiled static cache
    (``hf-generate-static-compiled``, ``hf_compiled``, default: ``compile``); transformers' assisted generation with
    its first ``assistant_early_exit`` layers as the draft and with ``assistant_model`` as the draft. With
    ``compile``, every configuration also runs on a compiled engine (rows ``NAME +compile``). Compiled rows decode
    warm-up batches before timing (their wall time is the row's ``compile_seconds``). ``replay_ks``: the k of the
    replay rows (default ``REPLAY_KS`` when a configuration is self-speculative, else none)."""
    hf_compiled = compile if hf_compiled is None else hf_compiled
    fm = FlopsModel.from_config(model.config)
    engine = EarlyExitEngine(model, eos, pad_id)
    sampling = SamplingParams(max_new_tokens=max_new_tokens)
    batches = _batches(list(prompt_ids), batch_size)
    machine = describe_machine()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    device = next(model.parameters()).device
    # Warm up both paths (allocator, kernels) so the first timed configuration is not penalised.
    hf_greedy_generate(model, batches[0][:1], 4, pad_id, eos)
    engine.generate(batches[0][:1], ExitConfig(), SamplingParams(max_new_tokens=4))
    runs = {name: (engine, cfg) for name, cfg in configs.items()}
    if replay_ks is None:
        replay_ks = REPLAY_KS if any(cfg.policy == "self-speculative" for cfg in configs.values()) else ()
    compile_seconds: dict[str, float] = {}
    replays: dict[str, tuple[EarlyExitEngine, ExitConfig]] = {}  # replay rows: (engine, config); answers per batch
    compiled = EarlyExitEngine(model, eos, pad_id, compile=True) if compile else None
    for k in replay_ks:
        replays[replay_name(k, compile)] = (compiled or engine, ExitConfig(policy="self-speculative", num_draft=k))
    if compile:
        # Graphs compile on first use. Every shape the timed run can meet is met here first: the batch size (and,
        # as rows finish, any smaller batch of 2 or more: one graph), one row, and every configuration and k.
        first = batches[0]
        warm = [first] + ([first[:1]] if len(first) > 1 else []) + ([first[:2]] if len(first) > 2 else [])
        warm_sampling = SamplingParams(max_new_tokens=min(max_new_tokens, WARM_TOKENS))
        for name, cfg in configs.items():
            before = compiled.compiled.compile_seconds
            for batch in warm:
                compiled.generate(batch, cfg, warm_sampling)
            compile_seconds[name + COMPILED] = compiled.compiled.compile_seconds - before
            runs[name + COMPILED] = (compiled, cfg)
        for name, (eng, cfg) in replays.items():
            before = compiled.compiled.compile_seconds
            for batch in warm:
                answers = [r.token_ids for r in compiled.generate(batch, ExitConfig(), warm_sampling)]
                compiled.generate(batch, cfg, warm_sampling, replay=answers)
            compile_seconds[name] = compiled.compiled.compile_seconds - before

    # transformers' own ways to decode these prompts, each a function (prompts, new, pad, eos) -> token lists.
    hf_runs = {BASELINE: lambda p, n, pad, e: hf_greedy_generate(model, p, n, pad, e)}
    if hf_compiled:
        static = HfStaticCompiled(model)
        t0 = time.perf_counter()
        try:
            # Compiles the prefill and decode graphs; a second prompt length lets dynamo mark the lengths dynamic
            # (transformers' docs: the first calls are slow), so the timed calls reuse the graphs.
            for warm in batches[:2]:
                static.generate(warm, max_new_tokens, pad_id, eos)
        except Exception as err:  # noqa: BLE001 - one baseline that cannot compile here must not cost the others
            logger.warning("%s left out: compiling transformers' static-cache forward failed: %s: %s",
                           HF_STATIC_COMPILED, type(err).__name__, str(err)[:300])
        else:
            compile_seconds[HF_STATIC_COMPILED] = time.perf_counter() - t0
            hf_runs[HF_STATIC_COMPILED] = static.generate
    if any(cfg.policy == "self-speculative" and "ngram" in cfg.draft for cfg in configs.values()):
        hf_runs[PROMPT_LOOKUP] = _one_at_a_time(
            lambda p, n, pad, e: hf_greedy_generate(model, p, n, pad, e, prompt_lookup=PROMPT_LOOKUP_TOKENS))
    if assistant_early_exit is not None:
        hf_runs[ASSISTED_EARLY_EXIT] = _one_at_a_time(
            lambda p, n, pad, e: hf_greedy_generate(model, p, n, pad, e, assistant_early_exit=assistant_early_exit))
    if assistant_model is not None:
        hf_runs[ASSISTED_DRAFT] = _one_at_a_time(
            lambda p, n, pad, e: hf_greedy_generate(model, p, n, pad, e, assistant_model=assistant_model))
        hf_runs[ASSISTED_DRAFT](batches[0][:1], 4, pad_id, eos)  # warm-up of the draft model

    # Interleaved: every batch runs through every configuration before the next batch, so load that comes and
    # goes on a shared machine hits all of them alike (sequential blocks made ratios swing by 2-3x there).
    seconds = {name: 0.0 for name in [*hf_runs, *runs, *replays]}
    timed_compile = {name: 0.0 for name in [*runs, *replays]}
    hf_outputs: dict[str, list[list[int]]] = {name: [] for name in hf_runs}
    outputs: dict[str, list[SequenceResult]] = {name: [] for name in [*runs, *replays]}
    ref_name = "final" + COMPILED if compile and "final" + COMPILED in runs else "final"
    loops: list[float] = []
    probe = BandwidthProbe(bandwidth_bytes, device) if floor else None
    for i, batch in enumerate(tqdm(batches, desc="bench", disable=not show_progress)):
        for name, generate in hf_runs.items():
            t0 = time.perf_counter()
            hf_outputs[name].extend(generate(batch, max_new_tokens, pad_id, eos))
            seconds[name] += time.perf_counter() - t0
        for name, (eng, cfg) in runs.items():
            before = eng.compiled.compile_seconds if eng.compiled is not None else 0.0
            t0 = time.perf_counter()
            outputs[name].extend(eng.generate(batch, cfg, sampling))
            seconds[name] += time.perf_counter() - t0
            if eng.compiled is not None:
                timed_compile[name] += eng.compiled.compile_seconds - before
        if replays:
            # The final layer's own answers to this batch (from `final` on the replay rows' engine when it ran).
            answers = ([r.token_ids for r in outputs[ref_name][-len(batch):]] if ref_name in runs else
                       [r.token_ids for r in (compiled or engine).generate(batch, ExitConfig(), sampling)])
        for name, (eng, cfg) in replays.items():
            replayed = replay_answers(eng, batch, cfg, sampling, answers)  # untimed
            before = eng.compiled.compile_seconds if eng.compiled is not None else 0.0
            t0 = time.perf_counter()
            outputs[name].extend(eng.generate(batch, cfg, sampling, replay=replayed))
            seconds[name] += time.perf_counter() - t0
            if eng.compiled is not None:
                timed_compile[name] += eng.compiled.compile_seconds - before
        if floor and (i % max(1, len(batches) // 4) == 0 or i == len(batches) - 1):
            loops.append(weights_loop_tokens_per_s(model, 10))
            probe.measure()
    rows: list[BenchRow] = []
    hf_out = hf_outputs[BASELINE]
    hf_tokens = sum(len(o) for o in hf_out)
    # Same convention as the engine: the prompt's prefill is not a generated token's cost; token i > 0 is one
    # full-depth step of token i-1 at context len(prompt) + i, plus the LM head.
    hf_flops = sum(
        (fm.num_layers * fm.layer(1, len(p) + i) if i else 0) + fm.head(1)
        for p, o in zip(prompt_ids, hf_out) for i in range(len(o))
    )
    base = BenchRow(BASELINE, hf_tokens, seconds[BASELINE], hf_tokens / seconds[BASELINE],
                    hf_flops / max(1, hf_tokens))
    rows.append(base)
    if floor:
        step_flops = fm.num_layers * fm.layer_linear + fm.head(1)
        tps = sum(loops) / len(loops)
        rows.append(BenchRow(LOOP, 0, 0.0, tps, step_flops, speedup=tps / base.tokens_per_s,
                             flops_ratio=step_flops / base.flops_per_token))
        nbytes, bandwidth = weight_bytes_per_token(model), probe.best
        del probe  # frees the tensor
        tps = bandwidth * 1e9 / nbytes
        rows.append(BenchRow(FLOOR, 0, 0.0, tps, step_flops, speedup=tps / base.tokens_per_s,
                             flops_ratio=step_flops / base.flops_per_token, bytes_per_token=nbytes,
                             bandwidth_gbs=bandwidth))
    for name, outs in hf_outputs.items():
        if name == BASELINE:
            continue
        n = sum(len(o) for o in outs)
        same_work = name == HF_STATIC_COMPILED  # the same forward passes; drafts' passes are not counted
        rows.append(BenchRow(name, n, seconds[name], n / seconds[name],
                             base.flops_per_token if same_work else None,
                             speedup=n / seconds[name] / base.tokens_per_s, flops_ratio=1.0 if same_work else None,
                             compile_seconds=compile_seconds.get(name)))
    for name, results in outputs.items():
        tokens = sum(len(r.token_ids) for r in results)
        flops = sum(r.flops for r in results)
        layers = [l for r in results for l in r.exit_layers]
        row = BenchRow(name, tokens, seconds[name], tokens / seconds[name], flops / max(1, tokens),
                       mean_exit_layer=sum(layers) / max(1, len(layers)), compile_seconds=compile_seconds.get(name))
        row.speedup = row.tokens_per_s / base.tokens_per_s
        row.flops_ratio = row.flops_per_token / base.flops_per_token
        row.acceptance, row.tau = draft_stats(results)
        if name.endswith(COMPILED):
            row.timed_compile_seconds = timed_compile[name]
            if timed_compile[name] > 0:
                logger.warning("%s: %.1f s of compilation inside the timed run (a shape the warm-up did not meet)",
                               name, timed_compile[name])
        rows.append(row)
    by_name = {r.name: r for r in rows}
    for row in rows:
        if row.name in outputs:
            final = by_name.get("final" + COMPILED if row.name.endswith(COMPILED) else "final")
            row.vs_final = row.tokens_per_s / final.tokens_per_s if final is not None else None
    reference = [r.token_ids for r in outputs["final"]] if "final" in outputs else hf_out
    for row in rows:
        row.dtype, row.machine = dtype, machine
        if row.name in (LOOP, FLOOR):
            continue
        seqs = hf_outputs[row.name] if row.name in hf_outputs else [r.token_ids for r in outputs[row.name]]
        row.agreement, row.identical = token_agreement(seqs, reference)
    return rows, outputs


def _pct(value: float | None, digits: int) -> str:
    return "" if value is None else f"{100 * value:.{digits}f}%"


def _num(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "" if value is None else f"{value / scale:.{digits}f}"


def set_similarity(rows: list[BenchRow], outputs: dict, decode) -> None:
    """``similarity`` (spaCy) and ``similarity_minilm`` of each engine row's answers to `final`'s (the same
    engine's `final` for compiled rows), ``decode`` turning token ids into text."""
    from layerexit.evaluation.similarity import embedding_similarities, spacy_similarities

    refs = {name: [decode(r.token_ids) for r in outs] for name, outs in outputs.items()
            if name in ("final", "final" + COMPILED)}
    for row in rows:
        if row.name not in outputs:
            continue
        ref = refs.get("final" + COMPILED if row.name.endswith(COMPILED) and "final" + COMPILED in refs else "final")
        if ref is None:
            continue
        texts = [decode(r.token_ids) for r in outputs[row.name]]
        row.similarity = float(sum(spacy_similarities(ref, texts)) / len(texts))
        row.similarity_minilm = float(sum(embedding_similarities(ref, texts)) / len(texts))


def bench_markdown(rows: list[BenchRow]) -> str:
    """The table docs/benchmarks.md records, with the machine and the floor's inputs below it."""
    with_sim = any(r.similarity is not None for r in rows)
    with_compile = any(r.compile_seconds is not None for r in rows)
    with_draft = any(r.tau is not None for r in rows)
    with_vs = with_draft or (with_sim and any(r.vs_final is not None for r in rows))
    lines = ["| configuration | tokens | tokens/s | x HF tok/s | FLOPs/token (M) | x HF FLOPs | agreement w/ final | "
             "identical seqs | mean exit layer |" + (" spaCy sim w/ final | MiniLM sim w/ final |" if with_sim else "")
             + (" x final (same engine) |" if with_vs else "")
             + (" acceptance by draft position | tau |" if with_draft else "")
             + (" compile (s) |" if with_compile else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|---|" if with_sim else "") + ("---|" if with_vs else "")
             + ("---|---|" if with_draft else "") + ("---|" if with_compile else "")]
    for r in rows:
        compile_cell = _num(r.compile_seconds, digits=1)
        if r.timed_compile_seconds:
            compile_cell += f" (+{r.timed_compile_seconds:.1f} timed)"
        lines.append(
            f"| {r.name} | {r.tokens} | {r.tokens_per_s:.1f} | {r.speedup:.2f} | {_num(r.flops_per_token, 1e6, 1)} | "
            f"{_num(r.flops_ratio)} | {_pct(r.agreement, 1)} | {_pct(r.identical, 0)} | "
            f"{_num(r.mean_exit_layer, digits=1)} |"
            + (f" {_num(r.similarity, digits=3)} | {_num(r.similarity_minilm, digits=3)} |" if with_sim else "")
            + (f" {_num(r.vs_final)} |" if with_vs else "")
            + (f" {' / '.join(f'{a:.2f}' for a in r.acceptance or [])} | {_num(r.tau)} |" if with_draft else "")
            + (f" {compile_cell} |" if with_compile else "")
        )
    notes = []
    if rows and rows[0].machine:
        from layerexit.machine import machine_line

        notes.append(f"machine: {machine_line(rows[0].machine)}; dtype {rows[0].dtype}")
    for r in rows:
        if r.name == FLOOR and r.bytes_per_token:
            notes.append(f"floor: {r.bytes_per_token / 1e6:.1f} MB of weights per token at {r.bandwidth_gbs:.1f} GB/s "
                         "(memory read bandwidth measured in this run)")
    return "\n".join(lines + ([""] + notes if notes else []))
