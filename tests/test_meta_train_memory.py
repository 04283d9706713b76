"""Constant memory: 50 MetaMD outer steps through the pipeline keep resident memory flat."""

from __future__ import annotations

import dataclasses
import gc
import os

import meta_train_lsq  # registers family "lsq-test"
import torch

import meta_train
from meta_train.cli import main
from meta_train.learners import get_learner_spec

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


class _Probe(meta_train_lsq.Wrapped):
    """Wraps a learner; records RSS after every meta-step (optionally leaking on purpose)."""

    rss: list[float] = []

    def __init__(self, inner, leak_mib: int) -> None:
        super().__init__(inner)
        self.leak_mib, self.kept = leak_mib, []

    def meta_step(self, **kw):
        record = self.inner.meta_step(**kw)
        if self.leak_mib:
            self.kept.append(torch.ones(self.leak_mib * 2**18))  # float32: 4 bytes each
        if self.inner.meta_steps == 10 or self.inner.meta_steps % 25 == 0:
            gc.collect()  # slow with torch loaded: only where RSS is compared
        _Probe.rss.append(_rss_mib())
        return record


def _build(config, source, device):
    opts = dict(config.options)
    leak = int(opts.pop("leak_mib"))
    inner_cfg = dataclasses.replace(config, learner="metamd", options=opts)
    return _Probe(get_learner_spec("metamd").builder()(inner_cfg, source, device), leak)


meta_train.register_learner("rss-probe", _build)


def _growth(tmp_path, leak_mib: int, steps: int) -> float:
    _Probe.rss = []
    args = [
        "--learner",
        "rss-probe",
        "--family",
        "lsq-test",
        "--out",
        str(tmp_path / str(leak_mib)),
    ]
    args += ["--source-option", "dim=64", "--source-option", "n=128", "--outer-steps", str(steps)]
    # 6-step inner runs in 3-step windows: the run in flight is carried across meta-steps
    args += ["--inner-steps", "6", "--option", "window=3", "--inner-lr", "0.001"]
    args += ["--tasks-per-step", "1"]
    args += ["--checkpoint-every", "10", "--no-progress", "--option", f"leak_mib={leak_mib}"]
    assert main(args) == 0
    assert len(_Probe.rss) == steps
    return _Probe.rss[-1] - _Probe.rss[9]  # from step 10 on: allocator and caches warmed up


def test_fifty_outer_steps_keep_resident_memory_flat(tmp_path) -> None:
    # the probe sees a leak of 4 MiB per step (so the flat result below is a measurement);
    # measured first, before memory the flat run frees can return to the OS and mask it
    leaked = _growth(tmp_path, 4, 25)
    assert leaked > 30.0, f"a 60 MiB leak showed as {leaked:.1f} MiB"
    growth = _growth(tmp_path, 0, 50)
    assert growth < 8.0, f"RSS grew by {growth:.1f} MiB over 40 outer steps"
