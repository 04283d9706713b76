"""Preconditioner files: exact round trip, shape validation, and nothing executed on load."""

import json
import os
import pickle

import pytest
import torch
from torch import nn

from metaopt import load_preconditioner, save_preconditioner
from metaopt.io import read_preconditioner_metadata
from metaopt.kron import KroneckerPreconditioner
from tests._cli import rewrite_safetensors


def _model(hidden=5):
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, hidden),
        nn.LayerNorm(hidden),
        nn.Linear(hidden, 3),
    )


@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("rank1", {}),
        ("lowrank", {"rank": 2, "learn_scale": True}),
        ("ekfac-shaped", {}),
        ("diag", {}),
        ("scalar", {}),
    ],
)
def test_round_trip_is_exact(tmp_path, family, options):
    torch.manual_seed(0)
    model = _model()
    pre = KroneckerPreconditioner.for_model(model, family, skip="^4\\.bias$", **options)
    with torch.no_grad():
        for p in pre.parameters():
            p.normal_()
    path = tmp_path / "pre.safetensors"
    save_preconditioner(pre, path, metadata={"note": "unit test", "steps": 3})
    loaded = load_preconditioner(path, _model())
    sd_a, sd_b = pre.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    out_a, out_b = pre.apply(grads), loaded.apply(grads)
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    meta = read_preconditioner_metadata(path)
    assert meta["family"] == family and meta["user"] == {"note": "unit test", "steps": 3}
    assert meta["skip"] == "^4\\.bias$"
    assert [f for f in os.listdir(tmp_path)] == ["pre.safetensors"]  # no temp files left


def test_mismatched_model_names_every_layer_with_both_shapes(tmp_path):
    path = tmp_path / "pre.safetensors"
    save_preconditioner(KroneckerPreconditioner.for_model(_model(5), "rank1"), path)
    with pytest.raises(ValueError) as err:
        load_preconditioner(path, _model(7))
    msg = str(err.value)
    assert "2: file 5x33 vs model 7x33" in msg
    assert "3.weight: file 1x5 vs model 1x7" in msg
    assert "4: file 3x6 vs model 3x8" in msg
    assert "\n" not in msg


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_preconditioner(path, _model())
    assert not marker.exists()
    # the same payload through torch.save's zip format is refused too
    torch.save({"x": Payload()}, path)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_preconditioner(path, _model())
    assert not marker.exists()
    # control: unpickling the payload really would have run it
    pickle.loads(pickle.dumps(Payload()))
    assert marker.exists()


def test_other_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_preconditioner(tmp_path / "missing.safetensors", _model())
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a metaopt preconditioner"):
        load_preconditioner(plain, _model())
    # a header that claims more bytes than the file has (truncated file)
    good = tmp_path / "good.safetensors"
    save_preconditioner(KroneckerPreconditioner.for_model(_model(), "rank1"), good)
    data = good.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="safetensors"):
        load_preconditioner(trunc, _model())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    assert json.loads(header["__metadata__"]["metaopt"])["format"].startswith("metaopt")


def test_failed_save_keeps_previous_file(tmp_path):
    path = tmp_path / "pre.safetensors"
    pre = KroneckerPreconditioner.for_model(_model(), "rank1")
    save_preconditioner(pre, path)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_preconditioner(pre, path, metadata={"bad": object()})  # not JSON-serialisable
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["pre.safetensors"]


def test_saved_file_has_ordinary_permissions(tmp_path):
    # oracle: the mode a plain open() gives a new file under the current umask
    model = nn.Linear(3, 2)
    pre = KroneckerPreconditioner.for_model(model, "rank1")
    save_preconditioner(pre, tmp_path / "p.safetensors")
    with open(tmp_path / "plain", "w"):
        pass
    assert (tmp_path / "p.safetensors").stat().st_mode & 0o777 == (
        (tmp_path / "plain").stat().st_mode & 0o777
    )


# --- hostile files: every one a one-line ValueError naming the field or tensor ---------------
def _saved(tmp_path, family="rank1"):
    path = tmp_path / "pre.safetensors"
    save_preconditioner(KroneckerPreconditioner.for_model(_model(), family), path)
    return path


def _first_key(path):
    from safetensors.torch import load_file

    return sorted(load_file(str(path)))[0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensors_are_refused_on_load_naming_the_tensor(tmp_path, bad):
    path = _saved(tmp_path)
    key = _first_key(path)

    def poison(data):
        data[key].view(-1)[0] = bad

    rewrite_safetensors(path, tensors=poison)
    with pytest.raises(ValueError, match=f"tensor '{key}' holds NaN or infinity") as err:
        load_preconditioner(path, _model())
    assert "\n" not in str(err.value)


def test_writing_a_non_finite_preconditioner_is_refused_and_keeps_the_old_file(tmp_path):
    path = _saved(tmp_path)
    before = path.read_bytes()
    pre = KroneckerPreconditioner.for_model(_model(), "rank1")
    name, param = next(iter(pre.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=f"tensor '{name}' is not finite; refusing to write"):
        save_preconditioner(pre, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["pre.safetensors"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("layers"), "metadata field 'layers' is missing; expected a dict"),
        (lambda m: m.update(layers=[1, 2]), "metadata field 'layers' is [1, 2]"),
        (lambda m: m.pop("family"), "metadata field 'family' is missing"),
        (lambda m: m.update(options="rank=1"), "metadata field 'options' is 'rank=1'"),
        (lambda m: m.update(skip="(unclosed"), "metadata skip='(unclosed' is not a valid regex"),
        (lambda m: m.update(skip=7), "metadata skip=7 is not a valid regex"),
        (lambda m: m["layers"].update({"2": [5, "x"]}), "metadata layers['2']=[5, 'x']"),
        # a rank1 file stores no options: the alias fixes rank = 1
        (lambda m: m.update(family="bogus"), "family='bogus' with options {} does not build"),
    ],
)
def test_malformed_metadata_is_refused_naming_the_field(tmp_path, edit, message):
    path = _saved(tmp_path)
    rewrite_safetensors(path, meta=edit)
    with pytest.raises(ValueError) as err:
        load_preconditioner(path, _model())
    assert message in str(err.value) and "\n" not in str(err.value)


def test_tensor_shapes_that_disagree_with_the_metadata_are_refused(tmp_path):
    path = _saved(tmp_path)
    key = _first_key(path)
    want = list(load_preconditioner(path, _model()).state_dict()[key].shape)

    def grow(data):
        data[key] = torch.zeros(want[0] + 1, *want[1:], dtype=data[key].dtype)

    rewrite_safetensors(path, tensors=grow)
    with pytest.raises(ValueError) as err:
        load_preconditioner(path, _model())
    grown = [want[0] + 1, *want[1:]]
    assert f"tensor '{key}' has shape {grown}, but the file's metadata" in str(err.value)
    assert f"gives {want}" in str(err.value)

    def integer(data):
        data[key] = torch.zeros(*want, dtype=torch.int64)

    rewrite_safetensors(path, tensors=integer)
    with pytest.raises(ValueError, match=f"tensor '{key}' has dtype torch.int64"):
        load_preconditioner(path, _model())

    def drop(data):
        del data[key]

    rewrite_safetensors(path, tensors=drop)
    with pytest.raises(ValueError, match=f"missing tensors \\['{key}'\\]"):
        load_preconditioner(path, _model())


def test_stale_temp_files_and_first_non_finite(tmp_path):
    from metaopt.io import first_non_finite, stale_temp_files

    names = [".checkpoint.safetensors.a1b2c3d4.tmp", ".metrics.jsonl.zz_99xy.tmp"]
    keep = ["checkpoint.safetensors", ".checkpoint.safetensors.tmp", ".other.a1b2c3d4.tmp"]
    for n in names + keep:
        (tmp_path / n).write_text("x")
    found = stale_temp_files(tmp_path, ["checkpoint.safetensors", "metrics.jsonl"])
    assert [p.name for p in found] == sorted(names)
    tree = {"a": [torch.zeros(2), (torch.ones(1), {"b": torch.tensor([1.0, float("inf")])})]}
    assert first_non_finite(tree, "state") == "state.a.1.1.b"
    assert first_non_finite({"i": torch.tensor([2**62]), "f": 1e308 * 10, "x": "nan"}) is None


@pytest.mark.parametrize("hparams", [[["momentum", 0.9]], "momentum=0.9", 3])
def test_malformed_optimizer_hparams_are_refused_naming_the_field(tmp_path, hparams):
    from metaopt import load_learned_optimizer, save_learned_optimizer
    from metaopt.optim import LearnedOptimizer

    path = tmp_path / "opt.safetensors"
    pre = KroneckerPreconditioner.for_model(_model(), "rank1")
    save_learned_optimizer(LearnedOptimizer(pre, "sgdm", {}, 0.1), path)
    rewrite_safetensors(path, meta=lambda m: m["optimizer"].update(hparams=hparams))
    with pytest.raises(ValueError) as err:
        load_learned_optimizer(path, _model())
    message = f"metadata field 'optimizer.hparams' is {hparams!r}; expected a dict"
    assert message in str(err.value) and "\n" not in str(err.value)
