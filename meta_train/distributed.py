"""torch.distributed for meta-training: one process per rank, tasks split across ranks.

Launched with ``torchrun --nproc_per_node=N -m meta_train ...`` (which sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``), :func:`setup` joins the
process group with gloo on CPU and NCCL on CUDA. Each outer step, rank ``r`` computes the
hypergradients of tasks ``[r::world_size]`` and the learner calls :meth:`Dist.all_reduce` on
the summed gradients (and its count of kept tasks), an in-place SUM across ranks, so every
rank takes the same meta-optimizer step. Only rank 0 writes files. A collective that waits
longer than ``timeout_s`` (``--dist-timeout``) raises :class:`CollectiveFailed`, so a hung
rank ends the job instead of stalling it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from metaopt.cli_support import one_line

__all__ = ["CollectiveFailed", "Dist", "setup"]


class CollectiveFailed(RuntimeError):
    """A collective timed out or lost a peer on this rank: another rank hung or died."""


@dataclass
class Dist:
    """The process's place in the run (``world_size == 1``: a plain single process)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialised_here: bool = False
    timeout_s: float = 300.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def all_reduce(self) -> Callable[[list[Tensor]], None] | None:
        """In-place SUM of a list of tensors across ranks (``None`` on a single process)."""
        return self._all_reduce if self.world_size > 1 else None

    def _collective(self, call: Callable[..., object], *args: object, **kwargs: object) -> None:
        try:
            call(*args, **kwargs)
        except RuntimeError as err:  # gloo/NCCL: "Timed out waiting ...", "Connection closed"
            reason = one_line(err)[:300]
            raise CollectiveFailed(
                f"rank {self.rank}: {call.__name__} failed (waited up to {self.timeout_s:g} s): "
                f"{reason}"
            ) from None

    def _all_reduce(self, tensors: list[Tensor]) -> None:
        # one collective per dtype: flatten, reduce, copy back (no precision is lost)
        groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for group in groups.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            self._collective(dist.all_reduce, flat, op=dist.ReduceOp.SUM)
            pos = 0
            for t in group:
                n = t.numel()
                t.copy_(flat[pos : pos + n].view_as(t))
                pos += n

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (e.g. a stop signal)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        self._collective(dist.all_reduce, t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on rank 0 (``[obj]`` elsewhere and on a
        single process). Pickles in transit between this job's own ranks."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size if self.is_main else []
        self._collective(dist.gather_object, obj, out if self.is_main else None, dst=0)
        return out if self.is_main else [obj]

    def barrier(self) -> None:
        if self.world_size > 1:
            self._collective(dist.barrier)

    def close(self) -> None:
        if self.initialised_here and dist.is_initialized():
            dist.destroy_process_group()
            self.initialised_here = False


def setup(device: str, timeout_s: float = 300.0) -> Dist:
    """Join the process group described by the torchrun environment, if any.

    Args:
        device: ``"cpu"`` or ``"cuda"`` (``"cuda"`` becomes ``cuda:LOCAL_RANK`` under torchrun).
        timeout_s: how long a collective (and joining the group) waits for the other ranks
            before it raises ``torch.distributed.DistError`` on this rank, so a hung or
            stopped rank fails the job (torchrun then stops the others) instead of stalling
            it (``--dist-timeout``; torch's own default is 30 minutes).

    Returns:
        A :class:`Dist`; ``world_size == 1`` when not launched by torchrun.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = torch.device(device)
    if world <= 1:
        return Dist(0, 1, dev, timeout_s=timeout_s)
    rank = int(os.environ["RANK"])
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    here = False
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(
            backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **kwargs
        )
        here = True
    return Dist(rank, world, dev, here, timeout_s)
