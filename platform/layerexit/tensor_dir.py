"""Directories of one safetensors file plus a JSON description, written atomically.

Teacher caches and exit adapters are both such directories (exported drafts use the same ``atomic_directory``). A
later run trusts one only when it is complete, so everything is written into a temporary sibling (the JSON last)
and renamed into place in one step: a crash leaves the old directory or nothing, never a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``directory`` to fill; on success it replaces ``directory`` in one rename, on
    any error it is removed (the old directory, if any, is left as it was)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.partial-"))
    try:
        yield tmp
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_tensor_dir(directory: str | Path, tensors: Mapping[str, torch.Tensor], meta: Mapping,
                     weights_name: str, meta_name: str) -> Path:
    """Write ``tensors`` to ``directory/weights_name`` and ``meta`` to ``directory/meta_name``, atomically."""
    from safetensors.torch import save_file

    with atomic_directory(directory) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / weights_name))
        (tmp / meta_name).write_text(json.dumps(meta, indent=2))
    return Path(directory)
