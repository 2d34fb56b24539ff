"""`dtype: auto` per stage of work and per CPU (layerexit.machine), with the detection patched to play a CPU with
and one without native bf16; every place that had a dtype or precision setting resolves `auto` the same way and
logs the choice."""

from __future__ import annotations

import logging

import pytest

from layerexit import machine
from layerexit.machine import CpuInfo, choose_dtype

AVX2_EPYC = CpuInfo("AMD EPYC 7B13", frozenset({"sse4_2", "avx", "avx2", "fma"}), "AVX2")
AMX_XEON = CpuInfo("Intel(R) Xeon(R) Platinum 8481C", frozenset(
    {"avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "amx_tile", "amx_int8"}), "AVX512")
AVX512_ONLY = CpuInfo("Intel(R) Xeon(R) Gold 6148", frozenset({"avx2", "avx512f", "avx512bw"}), "AVX512")


@pytest.fixture(params=["avx2", "amx"])
def cpu(request, monkeypatch) -> CpuInfo:
    info = AVX2_EPYC if request.param == "avx2" else AMX_XEON
    monkeypatch.setattr(machine, "detect_cpu", lambda: info)
    return info


def _no_native_bf16(monkeypatch, info: CpuInfo = AVX2_EPYC) -> None:
    monkeypatch.setattr(machine, "detect_cpu", lambda: info)


def test_cpuinfo_flags_decide_native_bf16() -> None:
    model, flags = machine._cpuinfo_fields("processor : 0\nmodel name : AMD EPYC 7B13\nflags : fpu avx2 fma\n")
    assert model == "AMD EPYC 7B13" and "avx2" in flags
    assert not AVX2_EPYC.native_bf16 and not AVX512_ONLY.native_bf16 and AMX_XEON.native_bf16
    assert AVX2_EPYC.isa == ["avx2"] and AMX_XEON.isa == ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]


@pytest.mark.parametrize("info", [AVX2_EPYC, AVX512_ONLY], ids=["avx2", "avx512-without-bf16"])
def test_auto_is_fp32_for_compute_bound_work_without_native_bf16(monkeypatch, caplog, info) -> None:
    _no_native_bf16(monkeypatch, info)
    with caplog.at_level(logging.INFO, logger="layerexit.machine"):
        assert choose_dtype("train").dtype == "float32"
        assert choose_dtype("prefill").dtype == "float32"
        assert choose_dtype("batched").dtype == "float32"
        decode = choose_dtype("decode")
    assert decode.dtype == "bfloat16" and "memory-bound" in decode.reason  # batch-1 decoding still wants bf16
    logged = [r.getMessage() for r in caplog.records]
    assert any("auto -> float32 for train" in m and "native bf16" in m for m in logged)
    assert any("auto -> float32 for prefill" in m for m in logged)
    assert any("auto -> bfloat16 for decode" in m for m in logged)


def test_auto_is_bf16_everywhere_with_native_bf16(monkeypatch, caplog) -> None:
    monkeypatch.setattr(machine, "detect_cpu", lambda: AMX_XEON)
    with caplog.at_level(logging.INFO, logger="layerexit.machine"):
        assert {s: choose_dtype(s).dtype for s in machine.STAGES} == dict.fromkeys(machine.STAGES, "bfloat16")
    assert sum("auto -> bfloat16" in r.getMessage() for r in caplog.records) == len(machine.STAGES)


def test_explicit_dtypes_are_kept_and_gpus_take_bf16(cpu) -> None:
    assert choose_dtype("train", "float32").dtype == "float32"
    assert choose_dtype("decode", "float32").dtype == "float32"
    assert choose_dtype("batched", "bfloat16").dtype == "bfloat16"
    assert choose_dtype("train", "auto", "cuda:0").dtype == "bfloat16"
    with pytest.raises(ValueError, match="unknown stage"):
        choose_dtype("inference")
    with pytest.raises(ValueError, match="unknown dtype"):
        choose_dtype("decode", "int8")


def test_training_precision_auto(monkeypatch, caplog, tmp_path) -> None:
    from layerexit.training.config import TrainConfig

    base = {"name": "t", "model": {"spec": "tiny"}, "lite": {"exit_layers": [2]}}
    _no_native_bf16(monkeypatch)
    cfg = TrainConfig.model_validate(base)
    assert cfg.deepspeed.precision == "auto" and cfg.distill.cache_precision == "auto"
    with caplog.at_level(logging.INFO, logger="layerexit.machine"):
        assert cfg.resolve_precision() == "fp32"
    assert any("auto -> float32 for train" in r.getMessage() for r in caplog.records)
    explicit = TrainConfig.model_validate({**base, "deepspeed": {"precision": "autocast_bf16"}})
    assert explicit.precision == "autocast_bf16"  # explicit settings are kept on any CPU
    gpu = TrainConfig.model_validate({**base, "scaling": {"use_gpu": True, "num_workers": 1}})
    assert gpu.precision == "bf16"
    monkeypatch.setattr(machine, "detect_cpu", lambda: AMX_XEON)
    assert cfg.precision == "autocast_bf16"  # fp32 weights, bf16 compute where the CPU has it natively


def test_teacher_cache_precision_auto(monkeypatch, caplog) -> None:
    from layerexit.data.teacher_cache import resolve_cache_precision

    _no_native_bf16(monkeypatch)
    with caplog.at_level(logging.INFO, logger="layerexit.machine"):
        assert resolve_cache_precision("auto") == "fp32"
    assert any("for prefill (teacher cache)" in r.getMessage() for r in caplog.records)
    assert resolve_cache_precision("autocast_bf16") == "autocast_bf16"
    monkeypatch.setattr(machine, "detect_cpu", lambda: AMX_XEON)
    assert resolve_cache_precision("auto") == "autocast_bf16"


def test_serving_dtype_auto(monkeypatch) -> None:
    from layerexit.serving.config import ServeArgs

    _no_native_bf16(monkeypatch)
    assert ServeArgs.model_validate({"device": "cpu"}).dtype_choice().dtype == "float32"  # batches of 8
    assert ServeArgs.model_validate({"device": "cpu", "max_batch_size": 1}).dtype_choice().dtype == "bfloat16"
    assert ServeArgs.model_validate({"device": "cpu", "dtype": "bfloat16"}).dtype_choice().dtype == "bfloat16"
    monkeypatch.setattr(machine, "detect_cpu", lambda: AMX_XEON)
    assert ServeArgs.model_validate({"device": "cpu"}).dtype_choice().dtype == "bfloat16"


def test_cpu_configs_default_to_auto() -> None:
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[2]
    for name in ("smollm2_lite.yaml", "smollm2_adapters.yaml", "smollm2_draft.yaml"):
        data = yaml.safe_load((repo / "jobs" / "configs" / name).read_text())
        assert data["deepspeed"]["precision"] == "auto", name
        assert data.get("distill", {}).get("cache_precision", "auto") == "auto", name
    serve = yaml.safe_load((repo / "serve_configs" / "smollm2.yaml").read_text())
    assert serve["applications"][0]["args"]["dtype"] == "auto"
    from layerexit.training.demo_stage import demo_config

    demo = demo_config("/tmp/layerexit-demo-config-test")
    assert demo.deepspeed.precision == "auto" and demo.distill.cache_precision == "auto"


def test_demo_training_runs_fp32_on_an_avx2_cpu(monkeypatch) -> None:
    """`make demo` must finish on an AVX2-only CPU: its training (and teacher cache) resolve to fp32 there."""
    from layerexit.data.teacher_cache import resolve_cache_precision
    from layerexit.training.demo_stage import demo_config

    _no_native_bf16(monkeypatch)
    cfg = demo_config("/tmp/layerexit-demo-config-test")
    assert cfg.precision == "fp32" and resolve_cache_precision(cfg.distill.cache_precision) == "fp32"


def test_bench_and_generate_log_auto(tiny_dir, prompts_file, monkeypatch, capsys) -> None:
    import json

    from layerexit.cli import main

    _no_native_bf16(monkeypatch)
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "2", "--json"]) == 0
    err = capsys.readouterr().err
    assert "dtype auto -> bfloat16" in err and "memory-bound" in err  # one prompt at a time: batch 1
    assert main(["bench", "--model", str(tiny_dir), "--prompts", str(prompts_file), "--limit", "2", "--policies",
                 "final", "--max-new-tokens", "2", "--batch-size", "2", "--json", "--bandwidth-mib", "16"]) == 0
    out = capsys.readouterr()
    assert "dtype auto -> float32" in out.err
    rows = json.loads(out.out.strip().splitlines()[-1])
    assert {r["dtype"] for r in rows} == {"float32"}
