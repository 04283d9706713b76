"""MkDocs hooks: pages generated at build time from the code.

* ``reference/cli.md``: the command-line reference, from the argparse parsers
  (:mod:`tools.cli_reference`), so it can never drift from ``--help``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

_HERE = Path(__file__).resolve().parent


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, _HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_files(files: Files, config: Any) -> Files:
    cli = _load("cli_reference")
    files.append(File.generated(config, "reference/cli.md", content=cli.render()))
    return files
