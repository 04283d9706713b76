"""Every code example in README.md and docs/ runs as a test (Sybil, one item per block).

* A ```` ```python ```` block runs in its page's namespace, in order, so a page reads like
  one session; a ```` ```bash ```` block runs under ``bash -euo pipefail`` (``python`` is
  this interpreter, the repository is on ``PYTHONPATH``).
* A ```` ```python title="name.py" ```` block is a file the reader saves: it is written to
  the page's working folder (a fresh temporary folder, also on ``sys.path``), not run.
* ``<!-- test: slow -->`` on the line before a block marks it (and every later block of the
  page, which may depend on it) ``slow``: deselected by default, run by ``make test-slow``.
  ``<!-- test: skip -->`` leaves a block out (commands that install, or take minutes).

Names a page registers (tasks, families, objectives, engines, rules, ...) are removed again
when the page is done, so no page changes what the other tests see.
"""

from __future__ import annotations

import ast
import functools
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent
_PACKAGES = ("metaopt", "tasks", "meta_train", "meta_test")

try:
    from sybil import Region, Sybil
    from sybil.parsers.markdown.lexers import RawFencedCodeBlockLexer
except ImportError:  # the dev extra installs it; without it the doc examples are not collected
    Sybil = None  # type: ignore[assignment,misc]

_INFO = re.compile(r"(?P<language>python|bash)(?P<info>[^\n]*)$\n", re.MULTILINE)
_TITLE = re.compile(r'title="(?P<title>[^"]+)"')
_MARK = re.compile(r"<!--\s*test:\s*(?P<mark>slow|skip)\s*-->\s*$")


@functools.cache
def _registry_names() -> tuple[tuple[str, str], ...]:
    """``(module, name)`` of each module-level ``NAME = Registry(...)`` in the packages'
    source (read, not imported: a table in a module nothing has imported yet is found too)."""
    names = []
    for package in _PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if "Registry(" not in text:
                continue
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            for node in ast.parse(text).body:
                target = node.target if isinstance(node, ast.AnnAssign) else None
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    target = node.targets[0]
                call = getattr(getattr(node, "value", None), "func", None)
                if isinstance(target, ast.Name) and getattr(call, "id", None) == "Registry":
                    names.append((module.removesuffix(".__init__"), target.id))
    return tuple(names)


def _registries() -> list[Any]:
    """Every name table a page may add to (restored after the page)."""
    import meta_train.builtin  # noqa: F401  (registers the built-in learners)

    return [getattr(importlib.import_module(m), name) for m, name in _registry_names()]


def _setup(namespace: dict[str, Any]) -> None:
    work = Path(tempfile.mkdtemp(prefix="metaopt-docs-"))
    namespace["__doc_state__"] = {
        "cwd": os.getcwd(),
        "work": work,
        "modules": set(sys.modules),
        "names": [(reg, set(reg)) for reg in _registries()],
        "done": set(),
    }
    os.chdir(work)
    sys.path.insert(0, str(work))


def _teardown(namespace: dict[str, Any]) -> None:
    state = namespace.pop("__doc_state__")
    os.chdir(state["cwd"])
    work = str(state["work"])
    if work in sys.path:
        sys.path.remove(work)
    for name in set(sys.modules) - state["modules"]:
        file = getattr(sys.modules[name], "__file__", None) or ""
        if file.startswith(work):
            del sys.modules[name]
    for reg, before in state["names"]:
        for name in set(reg) - before:
            if name in reg:  # an entry's removal takes its aliases with it
                reg.unregister(name)
    shutil.rmtree(work, ignore_errors=True)
    namespace.clear()


def _in_order(run: Any) -> Any:
    """Run the page's earlier blocks first when they have not run (``-m slow`` or ``-k``
    deselected them): a block may use what the blocks before it defined."""

    def evaluate(example: Any) -> None:
        done = example.namespace["__doc_state__"]["done"]
        for earlier in example.document.examples():
            if earlier.start >= example.start:
                break
            if earlier.start not in done:
                done.add(earlier.start)
                earlier.region.evaluator.__wrapped__(earlier)
        done.add(example.start)
        run(example)

    evaluate.__wrapped__ = run  # type: ignore[attr-defined]
    return evaluate


def _run_python(example: Any) -> None:
    source = example.parsed
    code = compile("\n" * example.line + source, example.path, "exec")
    exec(code, example.namespace)  # noqa: S102  (the documentation's own examples)


def _write_file(example: Any) -> None:
    title = example.region.lexemes["title"]
    Path(title).write_text(example.parsed)


def _run_bash(example: Any) -> None:
    work = Path.cwd()
    bin_dir = work / ".bin"
    bin_dir.mkdir(exist_ok=True)
    python = bin_dir / "python"  # a wrapper, not a link: a venv is found from the path run
    if not python.exists():
        python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        python.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(work), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", example.parsed],
        cwd=work, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(
            f"{example.path}:{example.line}: exit {done.returncode}\n"
            f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
        )


class _DocBlocks:
    """Sybil parser: python and bash fences, with the marks described above."""

    lexer = RawFencedCodeBlockLexer(info_pattern=_INFO)

    def __call__(self, document: Any) -> Any:
        slow = False
        for region in self.lexer(document):
            before = document.text[: region.start].rstrip("\n").rsplit("\n", 1)[-1]
            mark = _MARK.search(before)
            if mark and mark.group("mark") == "skip":
                continue
            slow = slow or bool(mark and mark.group("mark") == "slow")
            info = region.lexemes["info"]
            title = _TITLE.search(info)
            if region.lexemes["language"] == "bash":
                evaluator = _run_bash
            elif title:
                evaluator = _write_file
            else:
                evaluator = _run_python
            lexemes = {"slow": slow, "title": title.group("title") if title else None}
            source = str(region.lexemes["source"])
            yield Region(region.start, region.end, source, _in_order(evaluator), lexemes=lexemes)


if Sybil is not None:
    pytest_collect_file = Sybil(
        parsers=[_DocBlocks()],
        patterns=["README.md", "docs/*.md", "docs/**/*.md"],
        setup=_setup,
        teardown=_teardown,
    ).pytest()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        example = getattr(item, "example", None)
        if example is not None:
            if example.region.lexemes.get("slow"):
                item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.docs)
