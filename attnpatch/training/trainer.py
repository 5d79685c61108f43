"""The training loop: patch + EOT -> classifier -> attention pipeline -> losses.

Per iteration (``PatchTrainer.forward``)::

    batch (B, 3, H, W) in [0, 1] ──patch(+EOT)──> patched, mask
        patched ──classifier──> logits ──> classifier loss
        patched ──AttentionPipeline──> cross / self maps ──> attention losses
        patched vs batch ──> L2 norm loss;   patch pixels ──> TV (optional)

Gradient accumulation with a counter (``PatchTrainer.train``): the counter starts at 0;
``loss.backward()`` runs every iteration; ``optimizer.step()`` only when the counter reaches K,
then ``optimizer.zero_grad()`` (and only then) and the counter goes back to 0.

Classifier, UNet, VAE and text encoder are frozen and in eval mode throughout. Checkpoints
(:mod:`attnpatch.training.checkpoint`) hold the patch, :meth:`PatchTrainer.state_dict` and the
config: a resumed run ends with the same patch, bit for bit on CPU, as an uninterrupted one.

Randomness: iteration ``i``'s placement and EOT draws come from
:meth:`PatchTrainer.generator` (seeded from ``train.seed`` and ``i``), its batch from
:func:`~attnpatch.data.batches` (the same rule): never from torch's global generator, so one
config gives one run. Ctrl-C or SIGTERM stops after the current iteration and checkpoints it.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._util import derive_seed, freeze
from ..data import batch_indices, batches, fingerprint
from ..diffusion import (
    AttentionPipeline,
    AttentionResult,
    DiffusionParts,
    PromptEmbeds,
    class_prompt,
    token_indices,
)
from ..errors import ConfigError, DataError, InputError, RunFolderError
from ..images import CLASSIFIER_RANGE, check_image
from ..losses import LossTerms
from ..patch import AdversarialPatch, PatchParams
from .checkpoint import (
    check_resumable,
    checkpoint_folder,
    read_checkpoint,
    truncate_metrics,
    write_checkpoint,
)
from .config import TrainConfig, config_to_dict
from .config_checks import pipeline_memory
from .distributed import SINGLE, Dist, agreed
from .interrupt import CtrlC, Stopped
from .labels import class_indices
from .metrics_log import MetricsLog
from .terms import TermInputs, terms
from .weights import Update

__all__ = ["PatchTrainer", "IterationOutputs", "attention_pipeline"]


def attention_pipeline(config: TrainConfig, parts: DiffusionParts) -> AttentionPipeline:
    """The :class:`~attnpatch.AttentionPipeline` that ``config``'s ``[attention]`` section
    describes, on images of ``data.image_size`` (or ``attention.diffusion_size``)."""
    a = config.attention
    return AttentionPipeline(
        parts,
        num_inference_steps=a.num_inference_steps,
        num_steps=a.num_steps,
        guidance_scale=a.guidance_scale,
        image_size=a.diffusion_size or config.data.image_size,
        cross_resolution=a.cross_resolution or None,
        self_resolutions=a.self_resolutions or None,
        memory=pipeline_memory(a),
    )


@dataclass
class IterationOutputs:
    """What the forward pass of one iteration produced (tensors keep their graphs).

    Attributes:
        images: the batch ``(B, 3, H, W)`` in [0, 1]; labels: ``(B,)`` true classes.
        targets: the classes the classifier loss uses (true labels, or the target class).
        patched: ``(B, 3, H, W)`` in [0, 1]; mask: ``(B, 1, H, W)`` in [0, 1].
        logits: ``(B, num_classes)``.
        attention: the attention pipeline's result, ``None`` when both attention weights are 0.
        terms: the loss terms (weighted total: ``terms.total()``).
        indices: the batch's data-set indices (keys of the cached self-attention references).
        inputs: what the terms read (:class:`~attnpatch.training.terms.TermInputs`; its maps
            are aggregated once and shared by the terms and the doctor).
    """

    images: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    patched: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    attention: AttentionResult | None
    terms: LossTerms
    indices: list[int]
    inputs: TermInputs | None = None


class PatchTrainer:
    """Trains an :class:`~attnpatch.AdversarialPatch` against a classifier, guided by attention.

    Args:
        config: the run's :class:`~attnpatch.TrainConfig` (already validated).
        classifier: ``(B, 3, H, W)`` in [0, 1] -> logits ``(B, C)``; frozen here.
        parts: the diffusion stack (:class:`~attnpatch.diffusion.DiffusionParts`); frozen here.
        patch: the patch to train.
        train_data: a data set of ``((3, H, W) in [0, 1], label)``, with ``.classes``.
        out_dir: where checkpoints and metrics go (``None``: nowhere).
        dist: this process of a data-parallel run (:mod:`attnpatch.training.distributed`);
            ``data.batch_size`` is then per process, and only process 0 writes.

    The class prompts (``data.prompt_template`` per class) are encoded once, here.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        classifier: nn.Module,
        parts: DiffusionParts,
        patch: AdversarialPatch,
        train_data: Any,
        out_dir: str | os.PathLike | None = None,
        dist: Dist = SINGLE,
    ):
        if not isinstance(parts, DiffusionParts):
            raise InputError(
                f"parts must be a DiffusionParts (attnpatch.load_diffusion(...)), got "
                f"{type(parts).__name__}"
            )
        if len(train_data) == 0:
            raise DataError("the training data set is empty; point data.train at images")
        self.config = config
        self.dist = dist
        self.classifier = freeze(classifier)
        for m in parts.modules():
            freeze(m)
        self.parts = parts
        self.patch = patch
        self.data = train_data
        self.classes = list(train_data.classes)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        #: ``{term: weight}`` (``weights.mode = "share"``: shares; "sum": weights), resolved
        self.weights = config.weights.resolved()
        active = [t for t in terms() if self.weights[t.name]]
        self.prompts = [class_prompt(c, config.data.prompt_template) for c in self.classes]
        self.tokens = [
            token_indices(parts.tokenizers, p, c) for p, c in zip(self.prompts, self.classes)
        ]
        self.attention: AttentionPipeline | None = None
        self.class_embeds: PromptEmbeds | None = None  # the class prompts' embeddings, C rows
        if any(t.uses for t in active):
            self.attention = attention_pipeline(config, parts)
            self.class_embeds = self.attention.encode_prompts(self.prompts)
        #: data-set label -> classifier output index, matched by class name (training/labels.py)
        self.logit_index = class_indices(
            self.classifier, self.classes, config.data.image_size, config.data.class_map
        )
        self.target = None
        if config.attack.targeted:
            if config.attack.target not in self.classes:
                raise ConfigError(
                    f"attack.target {config.attack.target!r} is not a class of the data "
                    f"({self.classes})"
                )
            self.target = int(self.logit_index[self.classes.index(config.attack.target)])
        self._check_inputs()
        self.optimizer = _optimizer(config, patch)
        self.iteration = 0  # iterations done
        self.counter = 0  # the accumulation counter
        self.steps = 0  # optimizer steps done
        self._references: dict[int, dict[str, torch.Tensor]] = {}
        #: how each iteration's terms become the patch's gradient (weights.mode)
        self.update = Update(config.weights, self._mean_over_processes)
        #: each term's measured share of the update at the last measuring iteration
        self.last_shares: dict[str, float] | None = None
        self.tracker = None  #: gets metrics.jsonl's records too (training/tracking.py)
        self.notes: list[str] = []  #: what a resume found worth saying (run_training prints it)
        self._fingerprint: dict[str, Any] | None = None
        #: Functions called with ``(trainer, outputs)`` after each forward pass ("forward"),
        #: after each ``backward()`` ("backward"), and with ``(trainer, outputs, stepped)``
        #: after each iteration ("iteration"). The doctor and tests instrument the loop here.
        self.hooks: dict[str, list[Callable[..., None]]] = {
            "forward": [],
            "backward": [],
            "iteration": [],
        }

    # -- one forward pass ---------------------------------------------------------------------
    def draws(self, iteration: int, n: int, size: tuple[int, int]) -> PatchParams:
        """Iteration ``iteration``'s placement and EOT draws for ``n`` images of ``size``, from
        a CPU generator seeded by ``train.seed`` and the iteration alone
        (``derive_seed("attnpatch-patch", seed, i)``): the same in every run and process."""
        seed = derive_seed("attnpatch-patch", self.config.train.seed, iteration)
        g = torch.Generator().manual_seed(seed)
        return self.patch.sample_params(n, size, eot=self.config.patch.eot, generator=g)

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: Sequence[int] = (),
        *,
        params: PatchParams | None = None,
    ) -> IterationOutputs:
        """Patch, classify, run the attention pipeline, build every registered loss term
        (:mod:`~attnpatch.training.terms`) whose weight is not 0.

        ``params``: the placement/EOT draws (default: :meth:`draws` of ``self.iteration``)."""
        terms_ = LossTerms(self.weights)
        if params is None:
            params = self.draws(self.iteration, images.shape[0], tuple(images.shape[-2:]))
        # The patch checks the batch (layout, [0, 1]); its output is in [0, 1] by construction,
        # and to_diffusion_input / vae_encode check the diffusion side.
        patched, mask = self.patch(images, params=params)
        logits = self.classifier(patched)
        clf_labels = self.logit_index.to(labels.device)[labels]
        targets = clf_labels if self.target is None else torch.full_like(labels, self.target)
        x = TermInputs(images, labels, list(indices), targets, patched, mask, logits)
        if self.attention is not None:
            x.attention = self.attention(patched, self.class_embeds.take(labels))
        for t in terms():
            terms_.add(t.name, lambda t=t: t.compute(self, x))
        return IterationOutputs(
            images, labels, targets, patched, mask, logits, x.attention, terms_, list(indices), x
        )

    def backward(self, out: IterationOutputs) -> dict[str, float] | None:
        """Add this iteration's gradient to ``patch.pixels.grad`` by ``weights.mode``
        (:class:`~attnpatch.training.weights.Update`); ``out.terms`` then holds the weights
        that were used. Returns each term's measured share of the update on measuring
        iterations (``weights.measure_every``), else ``None``."""
        out.terms, measured = self.update.backward(out.terms, self.patch.pixels, self.iteration)
        return measured

    def _mean_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over processes (per-term gradients; identity in a single process)."""
        return tensor if self.dist.world == 1 else self.dist.sum(tensor) / self.dist.world

    def references(
        self, images: torch.Tensor, labels: torch.Tensor, indices: Sequence[int] = ()
    ) -> dict[str, torch.Tensor]:
        """Self-attention maps of the clean images (no grad), cached per data-set index."""
        cached = [self._references.get(int(i)) for i in indices]
        if indices and all(c is not None for c in cached):
            return {k: torch.cat([c[k] for c in cached]) for k in cached[0]}
        with torch.no_grad():
            maps = self.attention(images, self.class_embeds.take(labels)).self_maps()
        for row, i in enumerate(indices):
            self._references[int(i)] = {k: v[row : row + 1] for k, v in maps.items()}
        return maps

    # -- the loop -----------------------------------------------------------------------------
    def train(self, *, progress: bool | None = None) -> AdversarialPatch:
        """Run until ``config.train.iterations``; resumes from ``self.iteration``."""
        cfg, K, dist = self.config.train, self.config.train.accumulate, self.dist
        batch_size = self.config.data.batch_size * dist.world  # the global batch
        multi = dist.world > 1  # then every global batch is whole, so shards are equal
        show = (progress if progress is not None else cfg.progress) and dist.is_main
        log = MetricsLog(self.out_dir, dist, cfg.iterations, self.iteration, show, self.tracker)
        try:
            with CtrlC() as ctrl_c:
                for it, images, labels in batches(
                    self.data,
                    batch_size,
                    seed=cfg.seed,
                    start=self.iteration,
                    stop=cfg.iterations,
                    drop_last=multi,
                    device=self.patch.pixels.device,
                ):
                    indices = batch_indices(
                        len(self.data), batch_size, it, seed=cfg.seed, drop_last=multi
                    )
                    # draws for the whole global batch, from (seed, it): the same whatever N
                    params = self.draws(it, len(indices), tuple(images.shape[-2:]))
                    rows = dist.shard(len(indices))
                    out = self.forward(
                        images[rows], labels[rows], indices[rows], params=params.take(rows)
                    )
                    self._emit("forward", out)
                    measured = self.backward(out)  # every iteration
                    if measured is not None:
                        self.last_shares = measured
                    self._emit("backward", out)
                    self.counter += 1
                    stepped = self.counter == K
                    if stepped:  # only when the counter reaches K
                        dist.mean_(self.patch.pixels.grad)  # the one reduction per step
                        self.optimizer.step()
                        self.optimizer.zero_grad()  # only right after a step
                        self.patch.clamp_()  # keep the patch in [0, 1]
                        self.counter = 0
                        self.steps += 1
                    self.iteration = it + 1
                    log.add(self._record(out, stepped, measured))
                    self._emit("iteration", out, stepped)
                    due = cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0
                    if not multi or stepped or due or self.iteration == cfg.iterations:
                        log.flush()
                    if due:
                        self.save_checkpoint()
                    if ctrl_c.pressed if not multi else (stepped and agreed(ctrl_c, dist)):
                        log.flush()
                        self._interrupted(ctrl_c.signum)
        finally:
            log.close()
        return self.patch

    def _interrupted(self, signum: int) -> None:
        """After Ctrl-C or SIGTERM: checkpoint the last completed iteration, then raise
        :class:`~attnpatch.training.interrupt.Stopped` (a ``KeyboardInterrupt``)."""
        where = "nothing was written (no out_dir)"
        if self.out_dir is not None:
            where = f"checkpoint {self.save_checkpoint()} written; --resume continues the run"
        raise Stopped(signum, f"stopped after iteration {self.iteration}: {where}")

    def _emit(self, event: str, *args: Any) -> None:
        for hook in self.hooks[event]:
            hook(self, *args)

    # -- logging ------------------------------------------------------------------------------
    def _record(
        self, out: IterationOutputs, stepped: bool, measured: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """One metrics line: every loss term separately (raw), the weighted total, the batch's
        success; on measuring iterations each term's share of the update (``share.<term>``)."""
        record = {"iteration": self.iteration - 1, "step": stepped, "counter": self.counter}
        record.update(out.terms.as_dict())
        weights = out.terms.weights  # those this iteration used (share mode: they move)
        for name in out.terms.values():
            record[f"weight.{name}"] = weights[name]
        for name, share in (measured or {}).items():
            record[f"share.{name}"] = share
        with torch.no_grad():
            pred = out.logits.argmax(dim=1)
            hit = pred == out.targets  # the target class, or any class but the true one
            if self.target is None:
                hit = ~hit
            record["success"] = float(hit.float().mean())
        return record

    # -- state and checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The loop's state besides the patch pixels: iteration, counter, optimizer steps, a copy
        of the optimizer state and the accumulated gradient. (No RNG state: every draw is a
        function of ``train.seed`` and the iteration.)"""
        grad = self.patch.pixels.grad
        grad = None if grad is None else grad.detach().clone()
        # mid-accumulation, each process holds its own unreduced gradient: keep them all
        grads = None if grad is None else [g.cpu() for g in self.dist.gather(grad)]
        return {
            "iteration": self.iteration,
            "counter": self.counter,
            "steps": self.steps,
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "grad": None if grads is None else grads[0],
            "world": self.dist.world,
            "grads": grads,  # one per process, in rank order
            "shares": self.update.state_dict(),
            "data": self.data_fingerprint(),  # checked on resume
        }

    def data_fingerprint(self) -> dict[str, Any]:
        """The training data's :func:`~attnpatch.data.fingerprint` (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.data)
        return self._fingerprint

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.optimizer.load_state_dict(state["optimizer"])
        world = state.get("world", 1)
        if world != self.dist.world and state["counter"] != 0:
            raise RunFolderError(
                f"this checkpoint was written by {world} process(es) in the middle of an "
                f"accumulation (counter {state['counter']} of K); resume it with {world} "
                "process(es), or from a checkpoint at an optimizer step (counter 0)"
            )
        grads = state.get("grads")
        grad = grads[self.dist.rank] if grads and world == self.dist.world else state["grad"]
        self.patch.pixels.grad = None if grad is None else grad.to(self.patch.pixels.device)
        self.iteration, self.counter, self.steps = (
            state["iteration"],
            state["counter"],
            state["steps"],
        )
        self.update.load_state_dict(state.get("shares"))

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/it-NNNNNN/`` atomically and point ``checkpoints/latest`` at it."""
        if self.out_dir is None:
            raise InputError("this trainer has no out_dir; pass out_dir= to checkpoint")
        config, state = config_to_dict(self.config), self.state_dict()  # every process
        root = self.out_dir / "checkpoints"
        folder = root / f"it-{state['iteration']:06d}"
        if self.dist.is_main:  # process 0 alone writes
            folder = write_checkpoint(root, self.patch, state, config)
        self.dist.barrier()
        return folder

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> None:
        """Resume from a checkpoint folder (default: ``out_dir/checkpoints/latest``)."""
        folder = checkpoint_folder(self.out_dir, path)
        config = config_to_dict(self.config)
        loaded, state = read_checkpoint(folder, config, self.patch.pixels.device)
        self.notes += check_resumable(
            folder, loaded, state, self.patch, self.config, self.data_fingerprint(), self.dist.world
        )
        with torch.no_grad():
            self.patch.pixels.copy_(loaded.pixels)
        self.load_state_dict(state)
        if self.out_dir is not None and self.dist.is_main:
            note = truncate_metrics(self.out_dir / "metrics.jsonl", self.iteration)
            self.notes += [note] if note else []

    # -- checks -------------------------------------------------------------------------------
    def _check_inputs(self) -> None:
        """The first image's layout and range, and that the patch fits it (before any work)."""
        image, _ = self.data[0]
        check_image(image[None], CLASSIFIER_RANGE, name="training images")
        self.patch.sample_params(1, tuple(image.shape[-2:]), eot=False, generator=torch.Generator())


def _optimizer(config: TrainConfig, patch: AdversarialPatch) -> torch.optim.Optimizer:
    params = [patch.pixels]
    if config.train.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.train.lr)
    return torch.optim.SGD(params, lr=config.train.lr)
