"""The harness plots read well: short legend labels, legends outside the data, log axes only
where the values span decades."""

from __future__ import annotations

import json
import math

import matplotlib
import pytest

from meta_test.report import curve_figure, plot_label, spans_decades, write_plots

matplotlib.use("Agg")


def test_learned_specs_are_labelled_by_their_file_name():
    assert plot_label("learned:runs/demo/meta_train/learned_optimizer.safetensors") == (
        "learned:learned_optimizer"
    )
    assert plot_label("learned:/abs/x.safetensors?momentum=0.9") == "learned:x?momentum=0.9"
    assert plot_label("sgdm") == "sgdm" and plot_label("apo-lr:sgdm") == "apo-lr:sgdm"
    # two files of the same name keep their folders apart
    specs = ["learned:a/run1/opt.safetensors", "learned:a/run2/opt.safetensors"]
    assert [plot_label(s, specs) for s in specs] == ["learned:run1/opt", "learned:run2/opt"]


@pytest.mark.parametrize(
    ("values", "expected"),
    [([1.0, 0.5, 0.2], False), ([2.3, 0.01], True), ([1.0, 0.0], False), ([0.9, -1.0], False),
     ([1.0, math.nan, 1e-4], True), ([], False)],
)  # fmt: skip
def test_log_axis_only_when_positive_values_span_more_than_a_decade(values, expected):
    assert spans_decades(values) is expected


def test_legend_sits_outside_the_axes_and_loss_axis_is_log_when_it_spans_decades():
    import matplotlib.pyplot as plt

    fig = curve_figure([("a", [0, 1, 2], [2.0, 0.1, 0.01]), ("b", [0, 1, 2], [2.0, 1.0, None])],
                       xlabel="step", ylabel="loss", title="t")  # fmt: skip
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b"]
    fig.canvas.draw()
    box = legend.get_window_extent()
    axes_box = ax.get_window_extent()
    assert box.x0 >= axes_box.x1  # entirely to the right of the data area
    plt.close(fig)
    flat = curve_figure([("acc", [0, 1], [0.5, 0.9])], xlabel="s", ylabel="a", title="t")
    assert flat.axes[0].get_yscale() == "linear"
    plt.close(flat)


def test_write_plots_uses_the_short_labels(tmp_path, monkeypatch):
    import meta_test.report as report

    seen = []
    real = report.curve_figure

    def spy(series, **kw):
        seen.append([label for label, *_ in series])
        return real(series, **kw)

    monkeypatch.setattr(report, "curve_figure", spy)
    curves = {"steps": [0, 1], "train_loss_mean": [1.0, 0.5], "eval_steps": [0, 1],
              "test_metric_mean": [0.1, 0.9], "hparam_steps": [0, 1], "hparams": {}}  # fmt: skip
    entry = {"curves": curves, "test_metric_name": "accuracy"}
    results = {
        "task": "t",
        "optimizers": {"sgd": entry, "learned:r/x/learned_optimizer.safetensors": entry},
    }
    written = write_plots(json.loads(json.dumps(results)), tmp_path)
    assert written == ["train_loss.png", "test_metric.png"]
    assert seen[0] == ["sgd", "learned:learned_optimizer"]
    assert (tmp_path / "train_loss.png").stat().st_size > 0
