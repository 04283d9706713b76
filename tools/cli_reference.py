"""The command-line reference page, generated from the argparse parsers themselves.

``python tools/cli_reference.py`` prints the Markdown; the MkDocs hook
(``tools/docs_hooks.py``) adds it to the site as ``reference/cli.md`` at build time, so
the page always shows the flags, defaults and help texts of the code being documented.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

INTRO = """# Command lines

Generated at build time from `meta_train.cli.build_parser()` and
`meta_test.cli.build_parser()`: what you read here is what `--help` prints.

Both commands read `KEY=VALUE` options the same way: VALUE is a TOML value (`3`, `0.1`,
`true`/`false`, `"text"`, `[1, 2]`, `{truncate = 20}`); a bare word is a string. Both take
`--import MODULE` (a dotted name or a `.py` file, repeatable) to register your own tasks,
families, objectives, engines, learners or specs before any name is resolved
([guide](../guides/tasks.md#use-it-from-the-command-lines)). Bad input exits with code 2
and one line on stderr before anything is written.
"""


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from meta_test.cli import build_parser as meta_test_parser
    from meta_train.cli import build_parser as meta_train_parser

    return [("meta_train", meta_train_parser()), ("meta_test", meta_test_parser())]


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _flags(action: argparse.Action) -> str:
    names = ", ".join(f"`{s}`" for s in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    return f"{names} `{metavar}`"


def _default(action: argparse.Action) -> str:
    default = action.default
    if default in (None, argparse.SUPPRESS) or action.nargs == 0 or default == []:
        return ""
    return f"`{default}`"


def render_parser(name: str, parser: argparse.ArgumentParser) -> str:
    """One section: the usage line, the description and a table of every option."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps the usage line at the terminal width
    try:
        usage = parser.format_usage().strip()
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    lines = [f"## `python -m {name}`", "", _cell(parser.description or ""), "", "```text", usage,
             "```", "", "| option | default | what it does |", "|---|---|---|"]  # fmt: skip
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        required = " (required)" if action.required else ""
        lines.append(f"| {_flags(action)} | {_default(action)} | {_cell(action.help)}{required} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    return INTRO + "\n" + "\n".join(render_parser(n, p) for n, p in _parsers())


if __name__ == "__main__":
    sys.stdout.write(render())
