"""EAGLE-3 feature drafts in our engine (``draft: eagle3``) on a tiny LLaMA in fp32: greedy answers identical to
`final` at batch 1 and 4 with a random draft and with the replayed answer (the free perfect draft, acceptance exactly
1), rejected drafts rolled back in the target's and the draft's caches, the draft's aux features equal to
transformers' ``hidden_states``, a draft trained for another model refused naming the field, and the model directory
shipping the draft (``eagle3/`` + ``draft_settings.json``) through `layerexit bench`. The compiled path (k+1-column
verification and the draft layer as compiled graphs) is checked in the slow tests."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from layerexit.engine.bench import REPLAY, draft_stats, replay_name, run_bench
from layerexit.engine.compiled import draft_layer, static_inputs
from layerexit.engine.decode import EarlyExitEngine, SequenceResult
from layerexit.engine.drafters import FeatureDrafter
from layerexit.engine.options import ExitConfig, SamplingParams
from layerexit.errors import ConfigError
from layerexit.models.eagle3 import Eagle3Draft, Eagle3Spec

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [30, 31, 32]]  # unequal lengths: left padding
AUX = (1, 2, 3)


def _draft(model, seed: int = 0, vocab: list[int] | None = None, std: float = 0.2) -> Eagle3Draft:
    """A random draft (every weight matters), over a random half of the vocabulary unless ``vocab`` is given."""
    torch.manual_seed(seed)
    cfg = model.config
    size = len(vocab) if vocab is not None else cfg.vocab_size // 2
    spec = Eagle3Spec.for_target(cfg, aux_layers=AUX, draft_vocab_size=size)
    draft = Eagle3Draft(spec, model.get_input_embeddings())
    for p in draft.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=std)
    draft.set_vocab(vocab if vocab is not None else torch.randperm(cfg.vocab_size)[:size])
    return draft.eval()


def _engine(model, draft=None, compile: bool = False) -> EarlyExitEngine:
    engine = EarlyExitEngine(model, eos_token_ids=set(), pad_token_id=0, compile=compile)
    if draft is not None:
        engine.attach_eagle3(draft)
    return engine


def _spec(k: int) -> ExitConfig:
    return ExitConfig(policy="self-speculative", draft="eagle3", num_draft=k)


def _tokens(results) -> list[list[int]]:
    return [r.token_ids for r in results]


def _mostly_right_draft(model, prompts, new: int) -> Eagle3Draft:
    """A draft that always proposes the smallest id of its vocabulary: the token the first prompt's answer repeats,
    so that row accepts most drafts while the others reject them (mixed acceptance in one batch)."""
    final = _tokens(_engine(model).generate(prompts, ExitConfig(), SamplingParams(max_new_tokens=new)))
    repeated = max(set(final[0]), key=final[0].count)
    others = [t for t in range(repeated + 1, model.config.vocab_size) if t not in set(final[0])][:7]
    draft = _draft(model, vocab=[repeated, *others])
    with torch.no_grad():
        draft.lm_head.weight.zero_()  # every logit 0: argmax is draft id 0, i.e. ``repeated``
    return draft


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("k", [1, 3])
def test_random_eagle3_draft_gives_final_tokens(tiny_model, batch, k):
    engine = _engine(tiny_model, _draft(tiny_model))
    sp = SamplingParams(max_new_tokens=14)
    prompts = PROMPTS[:batch]
    out = engine.generate(prompts, _spec(k), sp)
    assert _tokens(out) == _tokens(engine.generate(prompts, ExitConfig(), sp))
    assert all(r.drafted_at and len(r.drafted_at) == k for r in out), "every step drafts k tokens"


@pytest.mark.parametrize("batch", [1, 4])
def test_replayed_answer_is_accepted_whole_and_equals_final(tiny_model, batch):
    engine = _engine(tiny_model)
    sp = SamplingParams(max_new_tokens=13)
    prompts = PROMPTS[:batch]
    final = _tokens(engine.generate(prompts, ExitConfig(), sp))
    for k in (1, 4):
        out = engine.generate(prompts, ExitConfig(policy="self-speculative", num_draft=k), sp, replay=final)
        assert _tokens(out) == final
        acceptance, tau = draft_stats(out)
        assert acceptance == [1.0] * k
        # tau: tokens per verification step (the first token comes from the prefill)
        assert tau == pytest.approx(sum(len(a) - 1 for a in final) / sum(r.drafted_at[0] for r in out))


def test_rejected_drafts_are_rolled_back_in_both_caches(tiny_model):
    """Mixed acceptance in one batch (one row accepts most drafts, the others reject them): the tokens are final's,
    every valid column of the target's cache holds what transformers computes for the accepted sequence, and every
    valid column of the draft's cache holds what the draft computes from scratch over the target's own features
    (rejected columns are holes that nothing reads, whatever they hold)."""
    model = tiny_model
    model.config._attn_implementation = "eager"
    prompts = [PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    draft = _mostly_right_draft(model, prompts, 15)
    engine = _engine(model, draft)
    engine.keep_last_cache = True
    sp = SamplingParams(max_new_tokens=15)
    results = {i: SequenceResult() for i in range(len(prompts))}
    for events in engine.stream(prompts, _spec(3), sp):
        for ev in events:
            results[ev.index].token_ids.append(ev.token_id)
            if ev.drafted:
                results[ev.index].count_draft(ev.drafted, ev.accepted)
            if ev.finished:  # the row is still in the batch: check its caches now, before it leaves
                _check_row_caches(model, draft, engine, engine.last_rows.index.index(ev.index))
                results[ev.index].finish_reason = ev.finish_reason
    assert all(r.finish_reason for r in results.values()), "every row's caches were checked"
    assert [results[i].token_ids for i in range(3)] == _tokens(_engine(model).generate(prompts, ExitConfig(), sp))
    accepted = [sum(r.accepted_at) for r in results.values()]
    rejected = [r.drafted_at[0] - r.accepted_at[-1] for r in results.values()]
    assert accepted[0] > 0 and all(n > 0 for n in rejected), (accepted, rejected)


def _check_row_caches(model, draft, engine, j: int) -> None:
    rows, cache = engine.last_rows, engine.last_cache
    L = engine.L
    t = cache.lengths[0]
    assert cache.lengths == [t] * (L + 1), "target and draft layers hold the same columns"
    cols = rows.valid[j, :t].nonzero().squeeze(1)
    seq = rows.tokens[j, cols][None]  # the accepted sequence (prompt + verified tokens)
    with torch.no_grad():
        ref = model(seq, use_cache=True, output_hidden_states=True)
    for layer in range(L):
        k_ref, v_ref = ref.past_key_values.layers[layer].keys, ref.past_key_values.layers[layer].values
        torch.testing.assert_close(cache.keys[layer][j, :, cols], k_ref[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(cache.values[layer][j, :, cols], v_ref[0], rtol=1e-4, atol=1e-4)
    # The draft from scratch: position i reads the token at i+1 and the target's features of position i.
    n = seq.shape[1] - 1
    with torch.no_grad():
        feats = draft.fuse(torch.cat([ref.hidden_states[a] for a in AUX], dim=-1))[:, :-1]
        scratch = draft(draft.embed(seq[:, 1:]), feats, torch.arange(n)[None])
    torch.testing.assert_close(cache.keys[L][j, :, cols[:-1]], scratch.keys[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache.values[L][j, :, cols[:-1]], scratch.values[0], rtol=1e-4, atol=1e-4)


def test_the_drafts_aux_features_are_the_models_hidden_states(tiny_model, monkeypatch):
    """The features the draft reads come from the verification pass (no extra layer) and equal transformers'
    ``output_hidden_states[a]`` of the accepted sequence at every accepted column, and at the prompt's."""
    engine = _engine(tiny_model, _mostly_right_draft(tiny_model, PROMPTS[:1], 12))
    engine.keep_last_cache = True
    seen = []  # (first column, columns to check, captured)
    start, update = FeatureDrafter.start, FeatureDrafter.update

    def record_start(self, e, rows, captured, s, first, q_start, k):
        seen.append((q_start, s.index.shape[0], {a: h.clone() for a, h in captured.items()}))
        return start(self, e, rows, captured, s, first, q_start, k)

    def record_update(self, e, rows, captured, s, t, drafts, accepted, bonus):
        seen.append((t, int(accepted[0]) + 1, {a: h.clone() for a, h in captured.items()}))
        return update(self, e, rows, captured, s, t, drafts, accepted, bonus)

    monkeypatch.setattr(FeatureDrafter, "start", record_start)
    monkeypatch.setattr(FeatureDrafter, "update", record_update)
    out = engine.generate(PROMPTS[:1], _spec(3), SamplingParams(max_new_tokens=12))
    assert sum(out[0].accepted_at) > 0 and len(seen) > 2
    rows = engine.last_rows
    t = engine.last_cache.lengths[0]
    valid = rows.valid[0, :t]
    position = valid.long().cumsum(0) - 1  # column -> position in the accepted sequence
    with torch.no_grad():
        hidden = tiny_model(rows.tokens[0, :t][valid][None], output_hidden_states=True).hidden_states
    checked = 0
    for first, n, captured in seen:
        assert sorted(captured) == list(AUX), "exactly the aux layers are captured"
        for i in range(n):
            if bool(valid[first + i]):
                for a in AUX:
                    torch.testing.assert_close(captured[a][0, i], hidden[a][0, position[first + i]], rtol=1e-4,
                                               atol=1e-4)
                checked += 1
    assert checked == t - int((~valid).sum()), "every column of the accepted sequence was checked"


class _JoinOnce:
    """Offers ``late`` (prompt, max_new_tokens) pairs at the second admission (a server's continuous batching)."""

    def __init__(self, late):
        self.late, self.calls = list(late), 0

    def admit(self, max_prompt_len, rows):
        self.calls += 1
        if self.calls < 2:
            return []
        fit = [(p, SamplingParams(max_new_tokens=n)) for p, n in self.late if len(p) <= max_prompt_len]
        self.late = [x for x in self.late if len(x[0]) > max_prompt_len]
        return fit

    def cancelled(self, index):
        return False


def test_rows_join_and_leave_a_drafting_batch(tiny_model):
    """Joining rows get their draft cache from their own prefill (and their first drafts), rows that finish leave
    with theirs: every row still decodes final's tokens."""
    draft = _mostly_right_draft(tiny_model, PROMPTS, 20)
    engine = _engine(tiny_model, draft)
    late = [([20, 21, 22], 6), ([23, 24, 25, 26, 27], 20), (PROMPTS[0], 9)]
    tokens: dict[int, list[int]] = {}
    for step in engine.stream(PROMPTS[:3], _spec(3), SamplingParams(max_new_tokens=10), joiner=_JoinOnce(late)):
        for ev in step:
            tokens.setdefault(ev.index, []).append(ev.token_id)
    expected = [(p, 10) for p in PROMPTS[:3]] + late
    assert sorted(tokens) == list(range(len(expected)))
    for i, (prompt, n) in enumerate(expected):
        assert tokens[i] == _tokens(_engine(tiny_model).generate([prompt], ExitConfig(),
                                                                 SamplingParams(max_new_tokens=n)))[0], i


def test_static_draft_layer_equals_the_draft_module(tiny_model):
    """The engine's static-shape draft layer (what gets compiled) computes Eagle3Draft.forward: its K/V in the
    buffer, its hidden state and its greedy draft token, as a target id."""
    draft = _draft(tiny_model, seed=3)
    engine = _engine(tiny_model, draft)
    fd = engine.feature_drafter()
    B, n, W = 2, 5, 9
    tokens = torch.randint(0, tiny_model.config.vocab_size, (B, n))
    aux = torch.randn(B, n, len(AUX) * tiny_model.config.hidden_size)
    valid = torch.zeros(B, W, dtype=torch.bool)
    valid[:, 2 : 2 + n] = True
    pos = torch.arange(n).expand(B, n)
    s = static_inputs(engine, aux[..., : tiny_model.config.hidden_size], valid, pos, 2)
    kbuf = torch.zeros(B, engine.kv_heads, W, engine.head_dim)
    vbuf = torch.zeros_like(kbuf)
    last = torch.tensor([n - 1, 2])
    with torch.no_grad():
        tok, hid = draft_layer(tokens, aux, s, last, fd.weights, kbuf, vbuf, fd.spec, True)
        ref = draft(draft.embed(tokens), draft.fuse(aux), pos)
    torch.testing.assert_close(kbuf[:, :, 2 : 2 + n], ref.keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vbuf[:, :, 2 : 2 + n], ref.values, rtol=1e-5, atol=1e-5)
    for j in range(B):
        torch.testing.assert_close(hid[j, 0], ref.hidden[j, last[j]], rtol=1e-5, atol=1e-5)
        assert int(tok[j, 0]) == int(draft.draft_to_target[ref.logits[j, last[j]].argmax()])


def test_a_draft_for_another_model_is_refused_naming_the_field(tiny_model):
    from layerexit.models.tiny import build_tiny_llama

    other = build_tiny_llama(num_layers=6)
    with pytest.raises(ConfigError, match=r"draft: the EAGLE-3 draft was trained for another model "
                                          r"\(num_hidden_layers 6 vs 4\)"):
        _engine(tiny_model, _draft(other))
    with pytest.raises(ConfigError, match="ships no EAGLE-3 draft"):
        _engine(tiny_model).generate(PROMPTS[:1], _spec(2), SamplingParams(max_new_tokens=3))


@pytest.fixture()
def eagle3_dir(tiny_dir, tmp_path):
    """The tiny model's directory as a trained model ships it: weights, ``eagle3/`` and ``draft_settings.json``."""
    from layerexit.models.draft_settings import write_draft_settings
    from layerexit.models.eagle3 import save_eagle3
    from layerexit.models.loading import load_model_and_tokenizer

    out = tmp_path / "model"
    shutil.copytree(tiny_dir, out)
    model, _ = load_model_and_tokenizer(str(out))
    save_eagle3(_draft(model), out / "eagle3", dtype=torch.float32)
    write_draft_settings(out, {"draft": "eagle3", "num_draft": 3})
    return out


def test_a_model_that_ships_the_draft_drafts_with_it(eagle3_dir):
    """`{"policy": "self-speculative"}` on the model drafts with its eagle3/ draft and shipped k; the bench reports
    acceptance per position, tau, the ratio to `final` and the replay rows (acceptance exactly 1)."""
    from layerexit.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(eagle3_dir))
    engine = EarlyExitEngine(model, {tok.eos_token_id}, tok.pad_token_id)
    sp = SamplingParams(max_new_tokens=8)
    out = engine.generate(PROMPTS[:2], ExitConfig(policy="self-speculative"), sp)
    assert _tokens(out) == _tokens(engine.generate(PROMPTS[:2], ExitConfig(), sp))
    assert max(len(r.drafted_at) for r in out) == 3, "the shipped num_draft"
    configs = {"final": ExitConfig(), "spec": ExitConfig(policy="self-speculative")}
    rows, _ = run_bench(model, PROMPTS, configs, {tok.eos_token_id}, tok.pad_token_id, max_new_tokens=8,
                        batch_size=2, show_progress=False, floor=False, replay_ks=(1, 2, 5))
    by = {r.name: r for r in rows}
    assert by["spec"].identical == 1.0 and len(by["spec"].acceptance) == 3 and by["spec"].tau >= 1.0
    assert by["spec"].vs_final == pytest.approx(by["spec"].tokens_per_s / by["final"].tokens_per_s)
    for k in (1, 2, 5):
        row = by[replay_name(k, False)]
        assert row.identical == 1.0 and row.acceptance == [1.0] * k, (k, row.acceptance)
    assert not [n for n in by if n.startswith(REPLAY) and n not in {replay_name(k, False) for k in (1, 2, 5)}]


def test_bench_cli_shows_the_draft_rows(eagle3_dir, prompts_file, capsys):
    from layerexit.cli import main

    code = main(["bench", "--model", str(eagle3_dir), "--prompts", str(prompts_file), "--limit", "2",
                 "--max-new-tokens", "5", "--policies", "final", "--threads", "1", "--dtype", "float32",
                 "--config", 'spec={"policy": "self-speculative"}', "--replay", "1,3", "--json",
                 "--bandwidth-mib", "64"])
    assert code == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])}
    assert rows["spec"]["identical"] == 1.0 and rows["spec"]["tau"] >= 1.0 and len(rows["spec"]["acceptance"]) == 3
    assert rows[replay_name(3, False)]["acceptance"] == [1.0, 1.0, 1.0]
    assert replay_name(2, False) not in rows


# -- the compiled path ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_eagle3_and_replay_equal_final_at_batch_1_and_4(tiny_model):
    """Verification of k+1 columns (capturing the aux features) and the draft layer run as compiled graphs: the
    tokens are final's at batch 1 and 4, with a random draft, a mostly-right one and the replayed answer; changing k
    compiles no new verification graph (the column count is dynamic)."""
    sp = SamplingParams(max_new_tokens=12)
    eager = _engine(tiny_model)
    compiled = _engine(tiny_model, _mostly_right_draft(tiny_model, PROMPTS, 12), compile=True)
    for batch in (4, 1):
        prompts = PROMPTS[:batch]
        final = _tokens(eager.generate(prompts, ExitConfig(), sp))
        out = compiled.generate(prompts, _spec(3), sp)
        assert _tokens(out) == final
        replayed = compiled.generate(prompts, ExitConfig(policy="self-speculative", num_draft=2), sp, replay=final)
        assert _tokens(replayed) == final and draft_stats(replayed)[0] == [1.0, 1.0]
    assert compiled.compiled.active and compiled.compiled.calls > 0
    graphs = compiled.compiled.graphs
    vocab = compiled.feature_drafter().draft.draft_to_target.tolist()
    compiled.attach_eagle3(_draft(tiny_model, seed=5, vocab=vocab))  # random weights, same shapes
    for batch in (4, 1):
        prompts = PROMPTS[:batch]
        out = compiled.generate(prompts, _spec(3), sp)
        assert _tokens(out) == _tokens(eager.generate(prompts, ExitConfig(), sp))
        replayed = compiled.generate(prompts, ExitConfig(policy="self-speculative", num_draft=4), sp,
                                     replay=_tokens(out))
        assert _tokens(replayed) == _tokens(out)
    assert compiled.compiled.graphs == graphs, "new draft weights or another k met no new shape"


@pytest.mark.slow
def test_compiled_bench_warms_every_shape_before_timing(eagle3_dir, prompts_file, capsys):
    """Rows join and leave (batch 4 -> 3 -> .. -> 1 as rows finish) and k changes across the replay rows: nothing
    compiles inside the timed run."""
    from layerexit.cli import main

    code = main(["bench", "--model", str(eagle3_dir), "--prompts", str(prompts_file), "--max-new-tokens", "10",
                 "--policies", "final", "--threads", "1", "--dtype", "float32", "--batch-size", "4", "--compile",
                 "--config", 'spec={"policy": "self-speculative"}', "--replay", "1,4", "--json",
                 "--bandwidth-mib", "64"])
    assert code == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])}
    for name in ("final +compile", "spec +compile", replay_name(1, True), replay_name(4, True)):
        assert rows[name]["timed_compile_seconds"] == 0.0, (name, rows[name]["timed_compile_seconds"])
        assert rows[name]["identical"] == 1.0
    assert rows[replay_name(4, True)]["acceptance"] == [1.0] * 4
