"""Throughput of the torchvision-backed task pipeline on full-size files in the real formats.

Writes a full-size MNIST (60,000 + 10,000 IDX images) and CIFAR-10 (5 x 10,000 + 10,000
pickled images) of random pixels to a temporary folder, builds the ``"mnist"`` and
``"cifar10"`` tasks on it and times training batches of 128 (PIL transforms, CIFAR with
crop/flip augmentation). CIFAR-10's md5 table is set to the written files' md5s (the
official ones cannot match random pixels), so its build time includes the md5 check.
Prints one JSON object as its last line.

    python bench/tasks_vision.py [--batches 20] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import tasks.vision  # noqa: F401  (registers the names)
import tasks.vision_data as vd
from tasks.registry import get_task


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim])
    return header + b"".join(int(d).to_bytes(4, "big") for d in array.shape) + array.tobytes()


def write_mnist(root: Path, rng: np.random.Generator) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem, n in (("train", 60_000), ("t10k", 10_000)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        (raw / f"{stem}-images-idx3-ubyte").write_bytes(idx_bytes(images))
        (raw / f"{stem}-labels-idx1-ubyte").write_bytes(idx_bytes(rng.integers(0, 10, n, np.uint8)))


def write_cifar10(root: Path, rng: np.random.Generator) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (10_000, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, 10_000).tolist()
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": labels}))
    meta = {"label_names": [str(i) for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    cls = vd.SOURCES["cifar10"].cls
    written = type(
        "CIFAR10WrittenMD5",
        (cls,),
        {
            "train_list": [[f, md5[f]] for f, _ in cls.train_list],
            "test_list": [[f, md5[f]] for f, _ in cls.test_list],
            "meta": {**cls.meta, "md5": md5["batches.meta"]},
        },
    )
    vd.SOURCES["cifar10"] = dataclasses.replace(vd.SOURCES["cifar10"], cls=written)


def time_task(name: str, root: Path, batches: int) -> dict[str, float]:
    start = time.perf_counter()
    task = get_task(name, data_root=root, model=lambda k: nn.Linear(1, k))
    build = time.perf_counter() - start
    stream = task.train_batches(seed=0)
    next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    per_batch = (time.perf_counter() - start) / batches
    return {
        f"{name}_build_s": round(build, 3),
        f"{name}_batch128_ms": round(1e3 * per_batch, 2),
        f"{name}_images_per_s": round(task.batch_size / per_batch),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_mnist(root, rng)
        write_cifar10(root, rng)
        result: dict[str, object] = {"threads": args.threads, "batches": args.batches}
        result |= time_task("mnist", root, args.batches)
        result |= time_task("cifar10", root, args.batches)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
