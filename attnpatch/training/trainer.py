"""The seed's training loop: patch + EOT -> classifier -> attention pipeline -> losses.

Per iteration (``PatchTrainer.forward``)::

    batch (B, 3, H, W) in [0, 1] ──patch(+EOT)──> patched, mask
        patched ──classifier──> logits ──> classifier loss
        patched ──AttentionPipeline──> cross / self maps ──> attention losses
        patched vs batch ──> L2 norm loss;   patch pixels ──> TV (optional)

Gradient accumulation exactly as the seed states (``PatchTrainer.train``): an iteration
counter starting at 0; ``loss.backward()`` every iteration; ``optimizer.step()`` only when the
counter reaches K, then ``optimizer.zero_grad()`` (and only then) and the counter back to 0.

Classifier, UNet, VAE and text encoder are frozen and in eval mode throughout. Checkpoints hold
the patch (safetensors), the optimizer state, the accumulated gradient, the counter, the
iteration, torch's RNG state and the config: a resumed run ends with the same patch, bit for
bit on CPU, as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import batch_indices, batches
from ..diffusion import AttentionPipeline, AttentionResult, token_indices
from ..errors import AttnPatchError
from ..images import CLASSIFIER_RANGE, check_image
from ..losses import (
    LossTerms,
    classifier_loss,
    cross_attention_region,
    cross_attention_variance,
    l2_norm,
    self_attention_structure,
    total_variation,
)
from ..patch import AdversarialPatch
from .config import TrainConfig, config_to_dict

__all__ = ["PatchTrainer", "Forward", "TERMS"]

#: The loss terms of the pipeline, in log order.
TERMS = ("classifier", "cross_attention", "self_attention", "l2", "tv")

#: Config fields that may differ between a checkpoint and the run resuming it.
_RESUMABLE_CHANGES = {
    "train.iterations",
    "train.progress",
    "train.checkpoint_every",
    "train.out_dir",
}


@dataclass
class Forward:
    """One iteration's forward pass (tensors keep their graphs).

    Attributes:
        images: the batch ``(B, 3, H, W)`` in [0, 1]; labels: ``(B,)`` true classes.
        targets: the classes the classifier loss uses (true labels, or the target class).
        patched: ``(B, 3, H, W)`` in [0, 1]; mask: ``(B, 1, H, W)`` in [0, 1].
        logits: ``(B, num_classes)``.
        attention: the attention pipeline's result, ``None`` when both attention weights are 0.
        terms: the loss terms (weighted total: ``terms.total()``).
        indices: the batch's data-set indices (keys of the cached self-attention references).
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


class PatchTrainer:
    """Trains an :class:`~attnpatch.AdversarialPatch` against a classifier, guided by attention.

    Args:
        config: the run's :class:`~attnpatch.config.TrainConfig` (already validated).
        classifier: ``(B, 3, H, W)`` in [0, 1] -> logits ``(B, C)``; frozen here.
        parts: the diffusion stack (unet, vae, text_encoder, tokenizer, scheduler, ...).
        patch: the patch to train.
        train_data: a data set of ``((3, H, W) in [0, 1], label)``, with ``.classes``.
        out_dir: where checkpoints and metrics go (``None``: nowhere).
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        classifier: nn.Module,
        parts: Any,
        patch: AdversarialPatch,
        train_data: Any,
        out_dir: str | os.PathLike | None = None,
    ):
        self.config = config
        self.classifier = _freeze(classifier)
        for m in (parts.unet, parts.vae, *getattr(parts, "text_encoders", (parts.text_encoder,))):
            _freeze(m)
        self.parts = parts
        self.patch = patch
        self.data = train_data
        self.classes = list(train_data.classes)
        if len(train_data) == 0:
            raise AttnPatchError("the training data set is empty; point data.train at images")
        self.out_dir = Path(out_dir) if out_dir is not None else None
        a, w = config.attention, config.weights
        self.weights = {name: float(getattr(w, name)) for name in TERMS}
        self.attention = None
        if self.weights["cross_attention"] or self.weights["self_attention"]:
            size = a.diffusion_size or config.data.image_size
            self.attention = AttentionPipeline(
                parts,
                num_inference_steps=a.num_inference_steps,
                num_steps=a.num_steps,
                guidance_scale=a.guidance_scale,
                image_size=size,
                cross_resolution=a.cross_resolution or None,
                self_resolutions=a.self_resolutions or None,
                checkpoint=a.checkpoint,
            )
        self.prompts = [config.data.prompt_template.format(label=c) for c in self.classes]
        self.tokens = [
            token_indices(parts.tokenizer, p, c) for p, c in zip(self.prompts, self.classes)
        ]
        #: data-set label -> classifier output index (identity unless the classifier names
        #: more classes than the data has, e.g. an ImageNet model on a subset)
        self.label_map = self._classifier_indices()
        self.target = None
        if config.attack.targeted:
            if config.attack.target not in self.classes:
                raise AttnPatchError(
                    f"attack.target {config.attack.target!r} is not a class of the data "
                    f"({self.classes})"
                )
            self.target = int(self.label_map[self.classes.index(config.attack.target)])
        self._check_inputs()
        self.optimizer = _optimizer(config, patch)
        self.iteration = 0  # iterations done
        self.counter = 0  # the seed's accumulation counter
        self.steps = 0  # optimizer steps done
        self._references: dict[int, dict[str, torch.Tensor]] = {}
        #: Functions called with ``(trainer, forward)`` after each forward pass ("forward"),
        #: after each ``backward()`` ("backward"), and with ``(trainer, forward, stepped)``
        #: after each iteration ("iteration"). The doctor and tests instrument the loop here.
        self.hooks: dict[str, list[Callable[..., None]]] = {
            "forward": [],
            "backward": [],
            "iteration": [],
        }

    # -- one forward pass ---------------------------------------------------------------------
    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, indices: Sequence[int] = ()
    ) -> Forward:
        """Patch, classify, run the attention pipeline, build every loss term."""
        terms = LossTerms(self.weights)
        # The patch checks the batch (layout, [0, 1]); its output is in [0, 1] by construction,
        # and to_diffusion_input / vae_encode check the diffusion side.
        patched, mask = self.patch(images, eot=self.config.patch.eot)
        logits = self.classifier(patched)
        clf_labels = self.label_map.to(labels.device)[labels]
        targets = clf_labels if self.target is None else torch.full_like(labels, self.target)
        terms.add("classifier", lambda: self.classifier_term(logits, targets))
        result = None
        if terms.wants("cross_attention", "self_attention"):
            result = self.attention(patched, [self.prompts[int(y)] for y in labels])
            res = self.attention.cross_resolution
            terms.add(
                "cross_attention",
                lambda: self.cross_attention_term(result.cross_maps(res), mask, labels),
            )
            terms.add(
                "self_attention",
                lambda: self_attention_structure(
                    result.self_maps(), self.references(images, labels, indices)
                ),
            )
        terms.add("l2", lambda: l2_norm(patched, images))
        terms.add("tv", lambda: total_variation(self.patch.pixels))
        return Forward(images, labels, targets, patched, mask, logits, result, terms, list(indices))

    def classifier_term(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The configured classifier loss on logits ``(B, C)``."""
        attack = self.config.attack
        kappa = {"kappa": attack.kappa} if attack.loss == "cw" else {}
        return classifier_loss(logits, targets, targeted=attack.targeted, kind=attack.loss, **kappa)

    def cross_attention_term(
        self, maps: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The configured cross-attention loss on maps ``(B, h, w, 77)`` for the labels' words;
        ``mask`` ``(B, 1, H, W)`` in [0, 1] is the placed patch (region losses)."""
        tokens = [self.tokens[int(y)] for y in labels]
        kind = self.config.attention.cross_loss
        if kind == "variance":
            return cross_attention_variance(maps, tokens)
        return cross_attention_region(maps, self.attention.resize_mask(mask), tokens, mode=kind)

    def references(
        self, images: torch.Tensor, labels: torch.Tensor, indices: Sequence[int] = ()
    ) -> dict[str, torch.Tensor]:
        """Self-attention maps of the clean images (no grad), cached per data-set index."""
        cached = [self._references.get(int(i)) for i in indices]
        if indices and all(c is not None for c in cached):
            return {k: torch.cat([c[k] for c in cached]) for k in cached[0]}
        with torch.no_grad():
            prompts = [self.prompts[int(y)] for y in labels]
            maps = self.attention(images, prompts).self_maps()
        for row, i in enumerate(indices):
            self._references[int(i)] = {k: v[row : row + 1] for k, v in maps.items()}
        return maps

    # -- the loop -----------------------------------------------------------------------------
    def train(self, *, progress: bool | None = None) -> AdversarialPatch:
        """Run until ``config.train.iterations``; resumes from ``self.iteration``."""
        cfg, K = self.config.train, self.config.train.accumulate
        bar = _progress(self, progress if progress is not None else cfg.progress)
        try:
            for it, images, labels in batches(
                self.data,
                self.config.data.batch_size,
                seed=cfg.seed,
                start=self.iteration,
                stop=cfg.iterations,
                device=self.patch.pixels.device,
            ):
                indices = batch_indices(
                    len(self.data), self.config.data.batch_size, it, seed=cfg.seed
                )
                fwd = self.forward(images, labels, indices)
                self._emit("forward", fwd)
                fwd.terms.total().backward()  # every iteration
                self._emit("backward", fwd)
                self.counter += 1
                stepped = self.counter == K
                if stepped:  # only when the counter reaches K
                    self.optimizer.step()
                    self.optimizer.zero_grad()  # only right after a step
                    self.patch.clamp_()  # keep the patch in [0, 1]
                    self.counter = 0
                    self.steps += 1
                self.iteration = it + 1
                self._log(fwd, stepped, bar)
                if cfg.checkpoint_every and self.iteration % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        return self.patch

    def _emit(self, event: str, *args: Any) -> None:
        for hook in self.hooks[event]:
            hook(self, *args)

    # -- logging ------------------------------------------------------------------------------
    def _log(self, fwd: Forward, stepped: bool, bar: Any) -> None:
        record = {"iteration": self.iteration - 1, "step": stepped, "counter": self.counter}
        record.update(fwd.terms.as_dict())
        with torch.no_grad():
            pred = fwd.logits.argmax(dim=1)
            hit = pred == fwd.targets  # the target class, or any class but the true one
            if self.target is None:
                hit = ~hit
            record["success"] = float(hit.float().mean())
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(_short(record))
        self._emit("iteration", fwd, stepped)

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/it-NNNNNN/`` atomically and point ``checkpoints/latest`` at it."""
        if self.out_dir is None:
            raise AttnPatchError("this trainer has no out_dir; pass out_dir= to checkpoint")
        root = self.out_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        name = f"it-{self.iteration:06d}"
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.patch.save(tmp / "patch.safetensors", extra={"iteration": str(self.iteration)})
        grad = self.patch.pixels.grad
        torch.save(
            {
                "iteration": self.iteration,
                "counter": self.counter,
                "steps": self.steps,
                "optimizer": self.optimizer.state_dict(),
                "grad": None if grad is None else grad.detach().cpu().clone(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            tmp / "state.pt",
        )
        (tmp / "config.json").write_text(json.dumps(config_to_dict(self.config), indent=2))
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(name)
        os.replace(pointer, root / "latest")
        for old in root.glob("it-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> None:
        """Resume from a checkpoint folder (default: ``out_dir/checkpoints/latest``)."""
        folder = _checkpoint_folder(self.out_dir, path)
        saved = json.loads((folder / "config.json").read_text())
        _check_same_config(saved, config_to_dict(self.config), folder)
        loaded = AdversarialPatch.load(
            folder / "patch.safetensors", device=self.patch.pixels.device
        )
        if loaded.size != self.patch.size:
            raise AttnPatchError(f"checkpoint patch size {loaded.size} != {self.patch.size}")
        state = torch.load(folder / "state.pt", map_location="cpu", weights_only=False)
        with torch.no_grad():
            self.patch.pixels.copy_(loaded.pixels)
        self.optimizer.load_state_dict(state["optimizer"])
        grad = state["grad"]
        self.patch.pixels.grad = None if grad is None else grad.to(self.patch.pixels.device)
        self.iteration, self.counter, self.steps = (
            state["iteration"],
            state["counter"],
            state["steps"],
        )
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.out_dir is not None:
            _truncate_metrics(self.out_dir / "metrics.jsonl", self.iteration)

    # -- checks -------------------------------------------------------------------------------
    def _check_inputs(self) -> None:
        """The first image's layout and range, and that the patch fits it (before any work)."""
        image, _ = self.data[0]
        check_image(image[None], CLASSIFIER_RANGE, name="training images")
        self.patch.sample_params(1, tuple(image.shape[-2:]), eot=False, generator=torch.Generator())

    def _classifier_indices(self) -> torch.Tensor:
        """Check the classifier's output on a probe; map data labels to its output indices."""
        size = self.config.data.image_size
        probe = torch.full((2, 3, size, size), 0.5, device=self.patch.pixels.device)
        with torch.no_grad():
            out = self.classifier(probe)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise AttnPatchError(
                f"the classifier must map (B, 3, H, W) to logits (B, classes), got {got}; wrap it "
                "so it returns logits"
            )
        n = out.shape[1]
        if n == len(self.classes):
            return torch.arange(n)
        names = getattr(self.classifier, "classes", None)
        missing = [c for c in self.classes if names is None or c not in names]
        if missing:
            raise AttnPatchError(
                f"the classifier has {n} outputs but the data has {len(self.classes)} classes "
                f"{self.classes}, and it names no output for {missing[:5]}; use a classifier "
                "trained on these classes, or one whose .classes names them (e.g. torchvision "
                "weights' categories), with data folders named like them"
            )
        return torch.tensor([names.index(c) for c in self.classes])


def _freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients (and none left over from earlier training)."""
    model.zero_grad(set_to_none=True)
    return model.eval().requires_grad_(False)


def _optimizer(config: TrainConfig, patch: AdversarialPatch) -> torch.optim.Optimizer:
    params = [patch.pixels]
    if config.train.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.train.lr)
    return torch.optim.SGD(params, lr=config.train.lr)


def _progress(trainer: PatchTrainer, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    cfg = trainer.config.train
    return tqdm(
        total=cfg.iterations, initial=trainer.iteration, desc="patch", unit="it", leave=True
    )


def _short(record: dict[str, Any]) -> str:
    """The losses, each separately, for the progress bar."""
    names = {"classifier": "cls", "cross_attention": "xattn", "self_attention": "sattn", "l2": "l2"}
    parts = [f"{short}={record[n]:.3g}" for n, short in names.items() if record.get(n) is not None]
    return " ".join(parts + [f"success={record['success']:.2f}"])


def _checkpoint_folder(out_dir: Path | None, path: str | os.PathLike | None) -> Path:
    if path is None:
        if out_dir is None:
            raise AttnPatchError("no checkpoint path and no out_dir to look in")
        pointer = out_dir / "checkpoints" / "latest"
        if not pointer.is_file():
            raise AttnPatchError(
                f"no checkpoint in {out_dir}/checkpoints; start without --resume, or pass the "
                "run folder of an earlier run"
            )
        return out_dir / "checkpoints" / pointer.read_text().strip()
    folder = Path(path)
    if (folder / "checkpoints" / "latest").is_file():
        return _checkpoint_folder(folder, None)
    if not (folder / "state.pt").is_file():
        raise AttnPatchError(f"{folder} is not a checkpoint folder (no state.pt)")
    return folder


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_same_config(saved: dict[str, Any], current: dict[str, Any], folder: Path) -> None:
    a, b = _flatten(saved), _flatten(current)
    diff = sorted(
        k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in _RESUMABLE_CHANGES
    )
    if diff:
        details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:5])
        raise AttnPatchError(
            f"checkpoint {folder} comes from a different config ({details}); resume with the "
            "config it was written with, or start a new run in another out_dir"
        )


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metric lines of iterations at or after ``iteration`` (they will be redone)."""
    if not path.is_file():
        return
    keep = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["iteration"] < iteration
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
