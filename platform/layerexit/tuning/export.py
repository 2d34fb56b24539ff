"""Export chosen thresholds: a thresholds file, the Serve ``user_config`` block, and an in-place rewrite of a Serve
config's ``user_config`` that keeps every comment and the rest of the file as it was (ruamel.yaml round-trip).

``serve deploy serve_configs/X.yaml`` then applies the new thresholds through the deployment's ``reconfigure``,
without restarting the replicas.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from layerexit.engine.thresholds import ThresholdsFile
from layerexit.errors import ConfigError

SERVE_IMPORT_PREFIX = "layerexit.serving"
# ExitConfig keys describing another policy; dropped when the block is rewritten so they cannot linger.
_STALE_KEYS = ("exit_layers", "layer", "classifier")


def user_config_block(thresholds: Mapping[int, float], kv: str = "recompute", policy: str = "confidence",
                      thresholds_file: str | Path | None = None, check_vocab: int | str = "full") -> dict[str, Any]:
    """The deployment ``user_config`` for these thresholds (no thresholds: the full model, policy final). A probe's
    weights do not fit a config block: ``policy: probe`` names the thresholds file holding them."""
    if not thresholds:
        return {"policy": "final", "kv": kv}
    if policy == "probe":
        if thresholds_file is None:
            raise ValueError("policy probe needs the thresholds file that holds the probe")
        return {"policy": "probe", "thresholds": str(Path(thresholds_file).resolve()), "kv": kv}
    block = {"policy": "confidence", "thresholds": {int(k): float(v) for k, v in sorted(thresholds.items())}, "kv": kv}
    if check_vocab != "full":
        block["check_vocab"] = int(check_vocab)
    return block


def write_thresholds_file(path: str | Path, model: str, num_layers: int, thresholds: Mapping[int, float],
                          source: str | None = None, probe=None) -> Path:
    """A thresholds file (``layerexit.engine.thresholds.ThresholdsFile``) the engine and Serve load; with ``probe``
    (a ``LinearProbe``) the thresholds gate its probabilities (policy probe)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = {int(k): float(v) for k, v in sorted(thresholds.items())}
    policy = "probe" if probe is not None and table else "confidence"
    return ThresholdsFile(model=model, num_layers=num_layers, exit_layers=sorted(table), policy=policy,
                          thresholds=table, probe=probe if policy == "probe" else None, source=source).save(path)


def _yaml():
    from ruamel.yaml import YAML

    y = YAML()  # round-trip: comments, key order, flow/block style and quotes survive
    y.preserve_quotes = True
    y.width = 4096
    y.indent(mapping=2, sequence=4, offset=2)
    return y


def _pick_application(apps: list, application: str | None, path: Path):
    if application is not None:
        found = [a for a in apps if isinstance(a, Mapping) and a.get("name") == application]
        if not found:
            names = [a.get("name") for a in apps if isinstance(a, Mapping)]
            raise ConfigError(f"{path} has no application named {application!r} (it has {names})",
                              "set export.application to one of them")
        return found[0]
    ours = [a for a in apps if isinstance(a, Mapping) and str(a.get("import_path", "")).startswith(SERVE_IMPORT_PREFIX)]
    if not ours:
        raise ConfigError(f"{path} has no application importing {SERVE_IMPORT_PREFIX}",
                          "pass a layerexit Serve config (serve_configs/*.yaml) or set export.application")
    if len(ours) > 1:
        raise ConfigError(f"{path} has {len(ours)} layerexit applications", "set export.application to choose one")
    return ours[0]


def rewrite_serve_config(path: str | Path, user_config: Mapping[str, Any], deployment: str = "EarlyExitLLM",
                         application: str | None = None, comment: str | None = None, dry_run: bool = False) -> str:
    """Replace the ``user_config`` of ``deployment`` in a Serve config file, in place, keeping comments.

    Returns the new text. The other keys of an existing ``user_config`` (and their comments) stay where they were;
    a flow-style thresholds mapping stays flow style; ``comment`` becomes the end-of-line comment of the
    ``thresholds`` line (where the thresholds came from). Raises ConfigError if the file is not a Serve config.
    """
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Serve config not found: {path}", "pass an existing serve_configs/*.yaml")
    y = _yaml()
    try:
        doc = y.load(path.read_text())
    except Exception as err:  # noqa: BLE001 - ruamel's parser/scanner errors
        raise ConfigError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    apps = doc.get("applications") if isinstance(doc, Mapping) else None
    if not isinstance(apps, list) or not apps:
        raise ConfigError(f"{path} has no `applications:` list", "pass a Ray Serve config file")
    app = _pick_application(apps, application, path)
    deployments = app.get("deployments")
    if deployments is None:
        deployments = CommentedSeq()
        app["deployments"] = deployments
    dep = next((d for d in deployments if isinstance(d, Mapping) and d.get("name") == deployment), None)
    if dep is None:
        dep = CommentedMap(name=deployment)
        deployments.append(dep)
    block = dict(user_config)
    uc = dep.get("user_config")
    if not isinstance(uc, CommentedMap):
        uc = CommentedMap()
        dep["user_config"] = uc
    old_thr = uc.get("thresholds")
    flow = not isinstance(old_thr, CommentedMap) or old_thr.fa.flow_style()
    for key in list(uc):
        if key in _STALE_KEYS or (key == "thresholds" and "thresholds" not in block):
            _delete_keeping_comments(uc, key)
    for key, value in block.items():
        if key == "thresholds" and isinstance(value, Mapping):
            table = CommentedMap((int(k), float(v)) for k, v in sorted(value.items()))
            if flow:
                table.fa.set_flow_style()
            uc[key] = table
        else:
            uc[key] = value
    if comment and "thresholds" in uc:
        uc.yaml_add_eol_comment(comment, "thresholds")
    buf = io.StringIO()
    y.dump(doc, buf)
    text = buf.getvalue()
    if not dry_run:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return text


def _delete_keeping_comments(mapping, key) -> None:
    """Delete ``key`` from a ruamel CommentedMap; full-line comments that followed it (ruamel stores them with the
    deleted key) move to the key before it, so comments about the *next* keys survive. Its own end-of-line comment
    goes with it."""
    from ruamel.yaml.error import CommentMark
    from ruamel.yaml.tokens import CommentToken

    keys = list(mapping)
    idx = keys.index(key)
    entry = mapping.ca.items.get(key)
    token = entry[2] if entry and len(entry) > 2 else None
    del mapping[key]
    mapping.ca.items.pop(key, None)
    if token is None:
        return
    _, _, rest = token.value.partition("\n")
    if not rest.strip():
        return
    if idx == 0:
        lines = [l for l in rest.splitlines() if l.strip()]
        indent = len(lines[0]) - len(lines[0].lstrip())
        mapping.yaml_set_start_comment("\n".join(l.strip()[1:].lstrip() for l in lines), indent=indent)
        return
    prev = mapping.ca.items.setdefault(keys[idx - 1], [None, None, None, None])
    if prev[2] is None:
        prev[2] = CommentToken("\n" + rest, CommentMark(0), None)
    else:
        prev[2].value = prev[2].value.rstrip("\n") + "\n" + rest


def user_config_yaml(user_config: Mapping[str, Any]) -> str:
    """The block as YAML text, ready to paste under a deployment's ``user_config:``."""
    from ruamel.yaml.comments import CommentedMap

    y = _yaml()
    data = CommentedMap()
    for key, value in user_config.items():
        if key == "thresholds" and isinstance(value, Mapping):  # a table; a string names a thresholds file
            table = CommentedMap((int(k), float(v)) for k, v in value.items())
            table.fa.set_flow_style()
            data[key] = table
        else:
            data[key] = value
    buf = io.StringIO()
    y.dump({"user_config": data}, buf)
    return buf.getvalue()


def register_exit_preset(registered_name: str, model_dir: str | Path | None, preset: str,
                         block: Mapping[str, Any], measured: Mapping[str, Any], work_dir: str | Path, run_id: str,
                         tracking_uri: str | None = None) -> dict[str, Any]:
    """Register ``model_dir`` again with the exit preset ``preset`` (``block``: ExitConfig fields, plus what it
    ``measured``) in its ``exit_presets.json``, as a new version of ``registered_name`` aliased ``preset``, logged
    into run ``run_id``. A static check vocabulary travels with it (``check_vocab.json``, relative)."""
    import shutil

    import mlflow

    from layerexit.models.exit_presets import read_exit_presets, write_exit_presets
    from layerexit.tracking import log_hf_model, setup_tracking

    if model_dir is None or not Path(model_dir).is_dir():
        raise ConfigError(f"preset {preset!r}: the model's local directory is unknown", "tune a models:/ URI")
    work = Path(work_dir)
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(model_dir, work)
    entry = {k: v for k, v in dict(block).items() if v is not None}
    if entry.get("check_vocab_file"):
        shutil.copyfile(entry["check_vocab_file"], work / "check_vocab.json")
        entry["check_vocab_file"] = "check_vocab.json"
    if entry.get("policy") == "probe":
        shutil.copyfile(entry["thresholds"], work / "exit_thresholds.yaml")
        entry["thresholds"] = "exit_thresholds.yaml"
    entry["measured"] = dict(measured)
    presets = read_exit_presets(work)
    presets = {k: {kk: (Path(vv).name if kk in ("check_vocab_file",) and isinstance(vv, str) else vv)
                   for kk, vv in v.items()} for k, v in presets.items()}
    presets[preset] = entry
    write_exit_presets(work, presets)
    setup_tracking(tracking_uri)
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        return log_hf_model(work, registered_name=registered_name, alias=preset)
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        return log_hf_model(work, registered_name=registered_name, alias=preset)
