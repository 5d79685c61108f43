"""Data-parallel training on Hugging Face accelerate: who this process is, and the two
collectives a run needs (docs/distributed.md).

A run launched by ``accelerate launch --num_processes N`` or ``torchrun --nproc_per_node N``
(``WORLD_SIZE > 1`` in the environment) builds an :class:`accelerate.Accelerator`; a plain
``attnpatch train`` does not import accelerate at all and behaves exactly as before.

What is synchronised, and when:

* the patch's gradient: **once per optimizer step** (:meth:`Dist.mean_`, an all-reduce mean
  right before ``optimizer.step()``); the K - 1 other iterations communicate nothing. accelerate
  leaves a bare ``nn.Parameter`` unwrapped (no DDP), so the reduction is explicit, and counted in
  :attr:`Dist.reductions`;
* the logged loss values: summed at the same moments (and at checkpoints) for the global mean;
* at a checkpoint, each process's accumulated gradient is gathered so process 0 can write it;
* evaluation counts: summed once at the end.

Process 0 alone writes the run folder.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import AttnPatchError

__all__ = ["Dist", "SINGLE", "from_environment", "global_means", "agreed"]


class Dist:
    """One process of ``world`` (``rank`` 0 is the main one); single-process when ``world == 1``.

    Args:
        accelerator: an :class:`accelerate.Accelerator` of a multi-process run, or ``None``.
    """

    def __init__(self, accelerator: Any = None):
        self.accelerator = accelerator
        self.rank = int(accelerator.process_index) if accelerator is not None else 0
        self.world = int(accelerator.num_processes) if accelerator is not None else 1
        self.reductions = 0  #: gradient all-reduces done (the communication-count test reads it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This process's rows of a global batch of ``n = world * b`` rows."""
        if n % self.world:
            raise AttnPatchError(
                f"a global batch of {n} does not split over {self.world} processes"
            )
        b = n // self.world
        return slice(self.rank * b, (self.rank + 1) * b)

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place to its mean over processes (the patch gradient)."""
        if self.world > 1:
            tensor.copy_(self.accelerator.reduce(tensor.detach().clone(), reduction="mean"))
            self.reductions += 1
        return tensor

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """A new tensor: ``tensor`` summed over processes (counts, loss values)."""
        out = tensor.detach().clone()
        if self.world > 1:  # on the process's device: NCCL reduces CUDA tensors only
            on = out.to(self.accelerator.device)
            out = self.accelerator.reduce(on, reduction="sum").to(tensor.device)
        return out

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every process's ``tensor`` (same shape on all), in rank order."""
        if self.world == 1:
            return [tensor]
        return list(self.accelerator.gather(tensor.detach().contiguous()[None]).unbind(0))

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()


#: The single-process run.
SINGLE = Dist()


def from_environment(device: str = "auto") -> Dist:
    """:data:`SINGLE` unless a launcher set ``WORLD_SIZE > 1``; then an ``Accelerator`` (on CPU
    with the gloo backend when ``device`` is ``"cpu"`` or no GPU is there)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    try:
        from accelerate import Accelerator
    except ImportError:  # pragma: no cover - accelerate is a dependency
        raise AttnPatchError(
            "a multi-process launch (WORLD_SIZE > 1) needs accelerate: pip install accelerate"
        ) from None
    cpu = device == "cpu" or not torch.cuda.is_available()
    return Dist(Accelerator(cpu=cpu))


def global_means(records: list[dict[str, Any]], dist: Dist) -> list[dict[str, Any]]:
    """Metric records with every float value replaced by its mean over processes (each
    process's value is the mean over its equal shard, so this is the global batch's mean); one
    collective for all of them. Other values (iteration, step, counter) are the same on all."""
    keys = [(i, k) for i, r in enumerate(records) for k, v in r.items() if isinstance(v, float)]
    if not keys:
        return records
    values = torch.tensor([records[i][k] for i, k in keys], dtype=torch.float64)
    means = (dist.sum(values) / dist.world).tolist()
    out = [dict(r) for r in records]
    for (i, k), v in zip(keys, means):
        out[i][k] = v
    return out


def agreed(ctrl_c: Any, dist: Dist) -> bool:
    """Whether any process saw Ctrl-C (asked at optimizer steps only, so every process stops
    after the same iteration)."""
    return bool(dist.sum(torch.tensor([float(ctrl_c.pressed)])).item() > 0)
