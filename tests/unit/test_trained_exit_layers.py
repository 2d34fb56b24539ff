"""Exit layers read from the trained model (``models.trained_for.trained_exit_layers``): the threshold search takes
them when ``space.exit_layers`` is unset, from the model's exit adapters or the lite.exit_layers its training run
recorded; a model that records none is refused naming the field."""

from __future__ import annotations

import json
import shutil

import pytest

from layerexit.errors import ConfigError
from layerexit.models.trained_for import RUN_INFO_FILE, trained_exit_layers
from layerexit.tuning.config import SearchSpaceSettings


def test_a_model_with_exit_adapters_gives_their_layers(tiny_model_and_tokenizer, tiny_dir, tmp_path):
    from layerexit.models.adapters import ADAPTERS_DIR, base_fingerprint, build_adapters, save_adapters

    model, tok = tiny_model_and_tokenizer
    out = tmp_path / "model"
    shutil.copytree(tiny_dir, out)
    save_adapters(build_adapters([3, 1], model.config.hidden_size, rank=4), out / ADAPTERS_DIR,
                  base_fingerprint(model, tok))
    layers, source = trained_exit_layers(str(out))
    assert layers == [1, 3] and "exit adapters" in source
    space, note = SearchSpaceSettings().resolve_exit_layers(str(out))
    assert space.exit_layers == [1, 3] and "[1, 3]" in note
    # Listed layers win over the model's.
    listed, note = SearchSpaceSettings(exit_layers=[2]).resolve_exit_layers(str(out))
    assert listed.exit_layers == [2] and note is None


def test_a_lite_checkpoint_gives_the_layers_its_run_recorded(tiny_dir, tmp_path):
    run = tmp_path / "storage" / "my_run"
    hf = run / "checkpoint_000010" / "hf_model"
    shutil.copytree(tiny_dir, hf)
    (run / RUN_INFO_FILE).write_text(json.dumps({"run_id": "x", "config": {"lite.exit_layers": [2, 1]}}))
    assert trained_exit_layers(str(hf))[0] == [1, 2]


def test_a_model_that_records_no_exits_is_refused_naming_the_field(tiny_dir):
    assert trained_exit_layers(str(tiny_dir)) is None
    with pytest.raises(ConfigError, match="space.exit_layers"):
        SearchSpaceSettings().resolve_exit_layers(str(tiny_dir))
    with pytest.raises(ValueError, match="not in exit_layers"):
        SearchSpaceSettings(exit_layers=[1], layer_ranges={2: (0.5, 1.0)})
