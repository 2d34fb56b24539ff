"""Writing the draft search's choice into a Serve config, in place, comments kept: a vLLM config's ``draft`` and
``num_draft`` args, or an engine config's self-speculative ``user_config``."""

from __future__ import annotations

import json
import os
from pathlib import Path

VLLM_BACKEND_IMPORT = "layerexit.serving.vllm_backend"


def serve_config_kind(path: str | Path, application: str | None = None) -> str:
    """``vllm`` (``layerexit.serving.vllm_backend``: draft and num_speculative_tokens args) or ``engine``
    (``layerexit.serving.app``: a self-speculative user_config). ConfigError for anything else."""
    import yaml

    from layerexit.deploy.k8s import read_serve_config
    from layerexit.tuning.export import _pick_application

    app = _pick_application(yaml.safe_load(read_serve_config(path))["applications"], application, Path(path))
    return "vllm" if str(app.get("import_path", "")).startswith(VLLM_BACKEND_IMPORT) else "engine"


def rewrite_serve_draft(path: str | Path, draft: str, layer: int, k: int, application: str | None = None,
                        comment: str | None = None, deployment: str = "EarlyExitLLM") -> str:
    """Point a Serve config at the chosen draft, in place, comments kept. vLLM config: its ``args.draft`` and
    ``args.num_draft`` (validated as ``VllmServeArgs`` before the file is written); engine config:
    the deployment's ``user_config`` becomes self-speculative at ``layer`` with ``k`` drafts."""
    from layerexit.tuning.export import _pick_application, _yaml, rewrite_serve_config

    path = Path(path)
    if serve_config_kind(path, application) == "engine":
        block = {"policy": "self-speculative", "draft": "layer", "layer": layer, "num_draft": k}
        return rewrite_serve_config(path, block, deployment, application)
    from ruamel.yaml.comments import CommentedMap

    from layerexit.serving.vllm_config import parse_vllm_args

    y = _yaml()
    doc = y.load(path.read_text())
    app = _pick_application(doc["applications"], application, path)
    args = app.get("args")
    if not isinstance(args, CommentedMap):
        args = CommentedMap()
        app["args"] = args
    args["draft"] = draft
    args.pop("num_speculative_tokens", None)  # the key num_draft replaced
    args["num_draft"] = k
    if comment:
        args.yaml_add_eol_comment(comment, "draft")
    parse_vllm_args(json.loads(json.dumps(args)), f"{path} args")
    import io

    buf = io.StringIO()
    y.dump(doc, buf)
    text = buf.getvalue()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return text
