"""Reading and writing Kubernetes manifests the way the files in k8s/ are laid out (ruamel.yaml round trip:
comments, key order and quoting kept). Shared by the RayService renderer (``deploy/k8s.py``) and the RayJob GPU
planner (``deploy/k8s_gpus.py``)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError as RuamelYAMLError

from layerexit.errors import ConfigError, InputFileError


def _round_trip_yaml() -> YAML:
    """A ruamel.yaml round-trip loader/dumper laid out like the manifests in k8s/ (2-space maps, indented lists)."""
    rt = YAML(typ="rt")
    rt.preserve_quotes = True
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.width = 4096  # never re-wrap long lines (entrypoints, args)
    return rt


def _load_manifest(manifest_path: Path, rt: YAML) -> list[Any]:
    if not manifest_path.is_file():
        raise InputFileError(f"manifest {manifest_path} does not exist", "pass --manifest k8s/rayservice-7b.yaml")
    try:
        return [doc for doc in rt.load_all(manifest_path.read_text(encoding="utf-8")) if doc is not None]
    except RuamelYAMLError as err:
        raise ConfigError(f"manifest {manifest_path} is not valid YAML: {err}") from err


def _dump(docs: list[Any], rt: YAML) -> str:
    out = io.StringIO()
    if len(docs) == 1:
        rt.dump(docs[0], out)
    else:
        rt.dump_all(docs, out)
    return out.getvalue()
