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

A process that stops without dying (a hung disk, a deadlocked data loader) would leave the
others waiting at the next collective forever. Every collective here waits at most
``train.collective_timeout_minutes`` (the process group's timeout); then the waiting processes
meet once more on a second, gloo group (``torch.distributed.monitored_barrier``), where process
0 learns which process did not arrive, and each fails with a
:class:`~attnpatch.errors.DistributedError` naming it. The launcher then ends the rest.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import DistributedError, InputError

__all__ = ["Dist", "SINGLE", "from_environment", "global_means", "agreed"]


class Dist:
    """One process of ``world`` (``rank`` 0 is the main one); single-process when ``world == 1``.


    Args:
        accelerator: an :class:`accelerate.Accelerator` of a multi-process run, or ``None``.
        timeout: the collectives' timeout (:class:`datetime.timedelta`), for the messages and
            the monitored barrier; monitor: the gloo group that barrier runs on.
    """

    def __init__(
        self,
        accelerator: Any = None,
        timeout: datetime.timedelta | None = None,
        monitor: Any = None,
    ):
        self.accelerator = accelerator
        self.rank = int(accelerator.process_index) if accelerator is not None else 0
        self.world = int(accelerator.num_processes) if accelerator is not None else 1
        self.reductions = 0  #: gradient all-reduces done (the communication-count test reads it)
        self.timeout = timeout
        self.monitor = monitor

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This process's rows of a global batch of ``n = world * b`` rows."""
        if n % self.world:
            raise InputError(f"a global batch of {n} does not split over {self.world} processes")
        b = n // self.world
        return slice(self.rank * b, (self.rank + 1) * b)

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce ``tensor`` in place to its mean over processes (the patch gradient)."""
        if self.world > 1:
            with self.collective("the gradient all-reduce"):
                reduced = self.accelerator.reduce(tensor.detach().clone(), reduction="mean")
            tensor.copy_(reduced)
            self.reductions += 1
        return tensor

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """A new tensor: ``tensor`` summed over processes (counts, loss values)."""
        out = tensor.detach().clone()
        if self.world > 1:  # on the process's device: NCCL reduces CUDA tensors only
            on = out.to(self.accelerator.device)
            with self.collective("a sum over processes"):
                out = self.accelerator.reduce(on, reduction="sum").to(tensor.device)
        return out

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every process's ``tensor`` (same shape on all), in rank order."""
        if self.world == 1:
            return [tensor]
        with self.collective("the gather of the gradients"):
            gathered = self.accelerator.gather(tensor.detach().contiguous()[None])
        return list(gathered.unbind(0))

    def close(self) -> None:
        """Destroy the process groups (this process's side; no collective). Without it the
        interpreter's exit may tear gloo's threads down in the wrong order and abort the
        process ("terminate called without an active exception", exit -6) after a finished
        run. Idempotent; nothing to do single-process."""
        if self.world > 1:
            import torch.distributed as torch_dist

            if torch_dist.is_available() and torch_dist.is_initialized():
                torch_dist.destroy_process_group()

    def barrier(self) -> None:
        if self.world > 1:
            with self.collective("a barrier"):
                self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def collective(self, what: str) -> Iterator[None]:
        """Run a collective; if it fails (its timeout, a peer gone), find out which process did
        not arrive and raise :class:`DistributedError` naming it."""
        try:
            yield
        except RuntimeError as e:  # torch.distributed.DistBackendError and gloo's errors
            raise DistributedError(self._stalled(what, e)) from e

    def _stalled(self, what: str, error: Exception) -> str:
        minutes = self.timeout.total_seconds() / 60 if self.timeout else None
        waited = (
            f"waited {minutes:g} min (train.collective_timeout_minutes)" if minutes else "failed"
        )
        late = self._missing()
        if late:
            who = ", ".join(str(r) for r in late)
            problem = f"process(es) {who} of {self.world} stopped responding"
        elif self.rank == 0:
            problem = f"another of the {self.world} processes stopped or died"
        else:
            problem = "process 0 names the one that stopped (or stopped itself)"
        return (
            f"process {self.rank}: {what} {waited}: {problem}; check that process's log and "
            "machine, then resume the run from its last checkpoint with --resume "
            f"({type(error).__name__}: {' '.join(str(error).split())[:160]})"
        )

    def _missing(self) -> list[int]:
        """The ranks that do not reach a monitored barrier on the gloo group (asked once, after
        a collective failed; rank 0 learns them, the others learn nothing)."""
        if self.monitor is None:
            return []
        import torch.distributed as torch_dist

        try:
            torch_dist.monitored_barrier(
                group=self.monitor, timeout=self.timeout, wait_all_ranks=True
            )
        except RuntimeError as e:
            found = re.search(r"Ranks? ([\d, ]+) failed to pass", str(e))
            if found:
                return [int(r) for r in found.group(1).replace(",", " ").split()]
        return []


#: The single-process run.
SINGLE = Dist()


def from_environment(device: str = "auto", timeout_minutes: float = 10.0) -> Dist:
    """:data:`SINGLE` unless a launcher set ``WORLD_SIZE > 1``; then an ``Accelerator`` (on CPU
    with the gloo backend when ``device`` is ``"cpu"`` or no GPU is there) whose collectives
    time out after ``timeout_minutes``, and a gloo group for finding a stalled process.

    (On CUDA, NCCL enforces the timeout in its watchdog, which ends the processes with its own
    message; set ``TORCH_NCCL_BLOCKING_WAIT=1`` to get this module's message instead.)"""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    try:
        from accelerate import Accelerator, InitProcessGroupKwargs
    except ImportError:  # pragma: no cover - accelerate is a dependency
        raise DistributedError(
            "a multi-process launch (WORLD_SIZE > 1) needs accelerate: pip install accelerate"
        ) from None
    import torch.distributed as torch_dist

    cpu = device == "cpu" or not torch.cuda.is_available()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
    monitor = torch_dist.new_group(backend="gloo", timeout=timeout)  # every process calls it
    return Dist(accelerator, timeout, monitor)


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
