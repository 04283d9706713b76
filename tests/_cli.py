"""Helpers shared by the command-line and file tests: folder snapshots, subprocess
environments, a free TCP port, safetensors files edited in place and compared."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root``: its path relative to ``root`` -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a child Python: one thread, ``extra`` on top, and the repository
    and ``tests/`` (for ``meta_train_lsq``) on its path."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rewrite_safetensors(
    path: Path,
    *,
    meta: Callable[[dict[str, Any]], None] | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> None:
    """Re-save a metaopt file with its ``"metaopt"`` metadata and/or tensors changed in place
    by the given functions."""
    with safe_open(str(path), framework="pt") as fh:
        info = json.loads(fh.metadata()["metaopt"])
    data = load_file(str(path))
    if meta is not None:
        meta(info)
    if tensors is not None:
        tensors(data)
    save_file(data, str(path), metadata={"metaopt": json.dumps(info)})


def assert_identical(a: Path, b: Path) -> None:
    """The two safetensors files hold the same names and bit-identical tensors."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
