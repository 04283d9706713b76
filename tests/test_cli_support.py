"""The values both CLIs parse: TOML KEY=VALUE with strict booleans, integers and floats in
range, devices, dtypes, annotated types, output folders and --import."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from metaopt.cli_support import (
    MAX_COUNT,
    check_device,
    check_output_dir,
    check_types,
    float_arg,
    import_modules,
    imports_in,
    int_arg,
    one_line,
    parse_dtype,
    parse_key_value,
    parse_options,
    parse_value,
    typed_task_options,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("3", 3),
        ("-2", -2),
        ("0.25", 0.25),
        ("1e-3", 1e-3),
        ("true", True),
        ("false", False),
        ("False", False),  # Python spelling: the boolean, never the truthy string 'False'
        ("TRUE", True),
        ('"float64"', "float64"),
        ("float64", "float64"),  # a bare word is a string
        ("runs/md-1", "runs/md-1"),
        ("[1, 2]", [1, 2]),
        ("{truncate = 20}", {"truncate": 20}),
        ('{"truncate" = 20, alpha = 0.5}', {"truncate": 20, "alpha": 0.5}),
        ("'single quoted'", "single quoted"),
    ],
)
def test_values_are_toml_with_bare_words_as_strings(raw, expected) -> None:
    value = parse_value(raw)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("raw", ['{"truncate": 20}', ".5", "1 2", "[1,", "a b", '"open', ""])
def test_values_that_are_neither_toml_nor_a_bare_word_are_refused(raw) -> None:
    with pytest.raises(ValueError, match="is not a value; VALUE is TOML") as err:
        parse_value(raw, "--option x")
    assert "\n" not in str(err.value) and "--option x=" in str(err.value)


def test_a_value_cannot_smuggle_a_second_toml_key() -> None:
    with pytest.raises(ValueError):
        parse_value("1\nw = 2")


def test_key_value_pairs_and_duplicates() -> None:
    assert parse_key_value("learn-scale=False", "--option") == ("learn_scale", False)
    assert parse_options(["a=1", "b=x"], "--option") == {"a": 1, "b": "x"}
    with pytest.raises(ValueError, match="--option a: given twice"):
        parse_options(["a=1", "a=2"], "--option")
    for bad in ("novalue", "=3", "two words=1"):
        with pytest.raises(ValueError, match="write KEY=VALUE"):
            parse_key_value(bad, "--option")


def test_integers_in_range_refuse_floats_huge_values_and_words() -> None:
    parse = int_arg(1)
    assert parse("12") == 12 and parse(str(MAX_COUNT)) == MAX_COUNT
    for bad in ("0", "-5", "1e20", "100000000000000000000", "1.0", "many", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="must be an integer in"):
            parse(bad)


def test_floats_must_be_finite() -> None:
    assert float_arg()("-0.5") == -0.5 and float_arg(positive=True)("2e-3") == 2e-3
    for bad in ("nan", "inf", "-inf", "1e400", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="finite"):
            float_arg()(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="positive"):
        float_arg(positive=True)("0")


def test_devices() -> None:
    assert check_device("cpu") == "cpu"
    for bad in ("cudaXYZ", "gpu0", "cuda:", "cuda:-1", "CPU", 3, "mps"):
        with pytest.raises(ValueError, match="must be 'cpu', 'cuda' or 'cuda:N'"):
            check_device(bad)
    if not torch.cuda.is_available():
        for absent in ("cuda", "cuda:0"):
            with pytest.raises(ValueError, match="no CUDA GPU is visible"):
                check_device(absent, "--device")
    else:
        n = torch.cuda.device_count()
        assert check_device("cuda") == "cuda"
        with pytest.raises(ValueError, match=f"{n} GPU"):
            check_device(f"cuda:{n}")


def test_dtypes_and_task_options() -> None:
    assert parse_dtype("float64") is torch.float64
    assert parse_dtype("torch.bfloat16") is torch.bfloat16
    assert parse_dtype(torch.float32) is torch.float32
    for bad in ("float128", "int64", 64, None):
        with pytest.raises(ValueError, match="must be one of"):
            parse_dtype(bad)
    opts = typed_task_options({"dtype": "float64", "n": 3}, "--task-option")
    assert opts == {"dtype": torch.float64, "n": 3}
    with pytest.raises(ValueError, match="--task-option device='gpu0'"):
        typed_task_options({"device": "gpu0"}, "--task-option")


@dataclasses.dataclass
class _Config:
    flag: bool = False
    count: int = 1
    rate: float = 0.1
    name: str = "x"
    limit: int | None = None
    table: dict[str, int] = dataclasses.field(default_factory=dict)
    pair: tuple[float, float] = (0.0, 1.0)


@pytest.mark.parametrize(
    ("field", "value", "ok"),
    [
        ("flag", True, True),
        ("flag", "maybe", False),
        ("flag", "False", False),
        ("flag", 1, False),
        ("count", 3, True),
        ("count", True, False),
        ("count", 3.0, False),
        ("rate", 2, True),  # an int is a float
        ("rate", "fast", False),
        ("name", 5, False),
        ("limit", None, True),
        ("limit", 4, True),
        ("limit", "none", False),
        ("table", {"a": 1}, True),
        ("table", [1], False),
        ("pair", [0.5, 0.6], True),
    ],
)
def test_annotated_types_of_a_dataclass(field, value, ok) -> None:
    config = dataclasses.replace(_Config(), **{field: value})
    if ok:
        check_types(config)
    else:
        with pytest.raises(ValueError, match=f"^{field}="):
            check_types(config)


def test_annotated_types_of_a_factory_and_a_class() -> None:
    def factory(width: int = 1, dtype: torch.dtype | None = None, **options: object) -> None:
        return None

    check_types(factory, {"width": 2, "dtype": torch.float64, "other": "free"})
    with pytest.raises(ValueError, match="width='many': must be int"):
        check_types(factory, {"width": "many"})

    class Family:
        name: str = "f"

        def __init__(self, dim: int = 3) -> None:
            self.dim = dim

    check_types(Family, {"dim": 4})
    with pytest.raises(ValueError, match="dim=4.5"):
        check_types(Family, {"dim": 4.5})


def test_output_dirs(tmp_path: Path, unwritable_out: Path) -> None:
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # probing creates nothing that stays
    assert not list(tmp_path.glob(".write-probe*"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(ValueError, match="lies under .*file'?, a regular file"):
        check_output_dir(tmp_path / "file" / "sub" / "out")
    with pytest.raises(ValueError, match="cannot write in"):
        check_output_dir(unwritable_out)


def test_import_modules_by_name_and_by_file(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "plugin_by_name.py").write_text("LOADED = True\n")
    (tmp_path / "plugin_by_file.py").write_text("LOADED = 'file'\n")
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('boom\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import_modules(["plugin_by_name", str(tmp_path / "plugin_by_file.py")])
    assert sys.modules["plugin_by_name"].LOADED is True
    assert sys.modules["plugin_by_file"].LOADED == "file"
    for name, reason in [
        ("no_such_plugin_module", "ModuleNotFoundError"),
        ("broken_plugin", "RuntimeError: boom second line"),
        (str(tmp_path / "absent.py"), "FileNotFoundError"),
    ]:
        with pytest.raises(ValueError, match=f"--import '.*': cannot be imported \\({reason}"):
            import_modules([name])
    assert "broken_plugin" not in sys.modules
    argv = ["--import", "a", "--out", "x", "--import=b.c", "--option", "import=3"]
    assert imports_in(argv) == ["a", "b.c"]


def test_one_line_joins_a_message_and_names_an_empty_one():
    assert one_line(ValueError("a  b\n  c\td ")) == "a b c d"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(RuntimeError("")) == "RuntimeError"
