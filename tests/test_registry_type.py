"""The one Registry type: decorator registration, aliases, duplicates, lazy targets."""

import pytest

from metaopt.registry import Registry


def test_decorator_alias_and_lookup():
    reg: Registry = Registry("thing")

    @reg.register("lowrank", description="low rank")
    def lowrank(rank=2):
        return rank

    reg.alias("rank1", "lowrank", rank=1)
    e = reg.get("rank1")
    assert e.obj is lowrank and e.target == "lowrank" and dict(e.options) == {"rank": 1}
    assert e.meta["description"] == "low rank"
    assert reg.get("lowrank").options == {}
    assert reg.available() == ["lowrank", "rank1"] and "rank1" in reg and "x" not in reg
    assert reg.canonical("rank1") == ("lowrank", {"rank": 1})


@pytest.mark.parametrize("name", ["lowrank", "rank1"])
def test_duplicates_refused_unless_replace(name):
    reg: Registry = Registry("thing")
    reg.register("lowrank", object())
    reg.alias("rank1", "lowrank", rank=1)
    with pytest.raises(ValueError, match=f"thing '{name}' is already registered"):
        reg.register(name, object())
    with pytest.raises(ValueError, match="already registered"):
        reg.alias(name, "lowrank")
    new = object()
    reg.register(name, new, replace=True)
    assert reg[name] is new and not reg.is_alias(name)


def test_unknown_names_list_what_is_allowed():
    reg: Registry = Registry("engine")
    reg.register("unroll", object())
    with pytest.raises(ValueError, match=r"engine='nope' is unknown; choose one of \['unroll'\]"):
        reg.get("nope")
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", object())
    with pytest.raises(ValueError, match="target 'missing' is not registered"):
        reg.alias("a", "missing")


def test_lazy_target_is_imported_once_and_bad_paths_are_errors():
    reg: Registry = Registry("fn")
    reg.register("sqrt", "math:sqrt")
    reg.register("broken", "no_such_module_xyz:fn")
    import math

    assert reg["sqrt"] is math.sqrt
    with pytest.raises(ValueError, match="no_such_module_xyz"):
        reg.get("broken")


def test_normalize():
    reg: Registry = Registry("spec", normalize=str.lower)
    reg.register("Adam", 1)
    assert reg["ADAM"] == 1 and reg.available() == ["adam"]


def test_check_options_names_the_bad_option_and_the_allowed_ones():
    from metaopt.registry import check_options, keyword_options

    def factory(shape, *, rank=1, init_scale=0.0):
        return shape

    def open_ended(**options):
        return options

    assert keyword_options(factory, supplied=("shape",)) == ["init_scale", "rank"]
    assert keyword_options(open_ended) is None  # checks its own options
    check_options(factory, {"rank": 2}, "family 'x'", supplied=("shape",))
    check_options(open_ended, {"anything": 1}, "task 'y'")
    with pytest.raises(
        ValueError,
        match=r"family 'x': unknown option\(s\) \['init_scal'\]; its options are "
        r"\['init_scale', 'rank'\]",
    ):
        check_options(factory, {"init_scal": 0.1}, "family 'x'", supplied=("shape",))
    with pytest.raises(ValueError, match=r"\['shape'\]"):  # a supplied name is no option
        check_options(factory, {"shape": (1, 2)}, "family 'x'", supplied=("shape",))


def test_unregistering_an_entry_removes_its_aliases():
    reg: Registry = Registry("thing")
    reg.register("lowrank", object())
    reg.register("diag", object())
    reg.alias("rank1", "lowrank", rank=1)
    reg.alias("rank2", "lowrank", rank=2)
    reg.alias("d", "diag")
    reg.unregister("lowrank")
    assert reg.available() == ["d", "diag"] and "rank1" not in reg and len(reg) == 2
    with pytest.raises(ValueError, match=r"'rank1' is unknown; choose one of \['d', 'diag'\]"):
        reg.get("rank1")
    with pytest.raises(ValueError, match="thing 'rank2' is not registered"):
        reg.unregister("rank2")
    reg.unregister("d")  # an alias alone leaves its target
    assert reg.available() == ["diag"] and reg.get("diag").target == "diag"


def test_an_entry_replaced_by_an_alias_takes_its_aliases_with_it():
    reg: Registry = Registry("thing")
    reg.register("lowrank", object())
    x = reg.register("x", object())
    reg.alias("rank1", "lowrank", rank=1)
    reg.alias("lowrank", "x", replace=True)
    assert reg.available() == ["lowrank", "x"] and reg["lowrank"] is x
