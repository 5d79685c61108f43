"""``attnpatch doctor``: the pipeline checklist and its failure classes, as measurements.

It runs a few instrumented iterations of the configured pipeline — the trainer's own loop,
observed through its hooks — and prints one line per check: PASS / FAIL / WARN with the
measured value (:mod:`attnpatch.training.report`). Every FAIL names the class of bug it points
to and a fix.

The checklist (docs/doctor.md) covers: loss backward / optimizer step / grad zero; image range
[-1, 1] in the diffusion pipeline; RGB and CHW in classifier and diffusion pipeline; hijack
removed after the attention maps; the losses logged separately; gradient enabled through DDIM
inversion; gradient flow through the denoise process. Its failure classification: loss does
not change -> grad flow / hijack hook / requires_grad; patch does not update -> grad zeroed /
loss backward / counter.

The doctor leaves the trainer as it found it: patch, optimizer state, gradient, counters and
torch's RNG state are restored afterwards.
"""

from __future__ import annotations

from typing import Any

import torch

from .._util import num_threads
from ..errors import AttnPatchError, ConfigError, HookError, ImageLayoutError, ImageRangeError
from ..hooks import attention_modules, is_hijacked
from ..images import CLASSIFIER_RANGE, DIFFUSION_RANGE
from .doctor_gradients import gradient_flow
from .report import FAIL, PASS, WARN, Report, grad_norm, image_check
from .trainer import IterationOutputs, PatchTrainer

__all__ = ["diagnose", "doctor"]


class _Observer:
    """Collects what the trainer's hooks show during the doctor's iterations."""

    def __init__(self, trainer: PatchTrainer):
        self.trainer = trainer
        self.grad_before_backward: list[float] = []
        self.grad_after_backward: list[float] = []
        self.backward_changed: list[bool] = []
        self._before: torch.Tensor | None = None
        self.counters: list[int] = []
        self.stepped: list[bool] = []
        self.patch_changed: list[bool] = []
        self.terms: list[dict[str, float | None]] = []
        self.first: IterationOutputs | None = None
        self._pixels = trainer.patch.pixels.detach().clone()

    def on_forward(self, trainer: PatchTrainer, fwd: IterationOutputs) -> None:
        grad = trainer.patch.pixels.grad
        self.grad_before_backward.append(grad_norm(grad))
        self._before = None if grad is None else grad.detach().clone()
        if self.first is None:
            self.first = fwd

    def on_backward(self, trainer: PatchTrainer, fwd: IterationOutputs) -> None:
        grad = trainer.patch.pixels.grad
        self.grad_after_backward.append(grad_norm(grad))
        before = self._before
        changed = grad is not None and (before is None or not torch.equal(grad, before))
        self.backward_changed.append(changed)

    def on_iteration(self, trainer: PatchTrainer, fwd: IterationOutputs, stepped: bool) -> None:
        self.counters.append(trainer.counter)
        self.stepped.append(stepped)
        pixels = trainer.patch.pixels.detach()
        self.patch_changed.append(not torch.equal(pixels, self._pixels))
        self._pixels = pixels.clone()
        self.terms.append(fwd.terms.as_dict())


def diagnose(trainer: PatchTrainer, *, iterations: int | None = None) -> Report:
    """Run ``iterations`` (default and minimum ``K + 1``) instrumented iterations of ``trainer``
    and check.

    The trainer is restored afterwards (patch, optimizer, gradient, counters, RNG).
    """
    report = Report()
    K = trainer.config.train.accumulate
    n = _iterations(iterations, K)
    saved = _snapshot(trainer)
    try:
        _static_checks(report, trainer)
        _first_forward(report, trainer)
        _loop_checks(report, trainer, n, K)
    except _Stop:
        pass
    finally:
        _restore(trainer, saved)
    return report


def _iterations(iterations: int | None, K: int) -> int:
    """The doctor's iteration count: default and minimum ``K + 1``."""
    n = iterations if iterations is not None else K + 1
    if isinstance(n, bool) or not isinstance(n, int) or n < K + 1:
        raise ConfigError(
            f"the doctor needs at least K + 1 = {K + 1} iterations (one optimizer step, then a "
            f"loss seen after it), got {iterations!r}; pass --iterations {K + 1} or more, or "
            "leave it out"
        )
    return n


def _static_checks(report: Report, trainer: PatchTrainer) -> None:
    pixels = trainer.patch.pixels
    if pixels.requires_grad:
        report.add("requires_grad: patch", PASS, f"patch {tuple(pixels.shape)} is trainable")
    else:
        report.add(
            "requires_grad: patch", FAIL, "patch.pixels.requires_grad is False", "requires_grad"
        )
    in_opt = any(p is pixels for g in trainer.optimizer.param_groups for p in g["params"])
    report.add(
        "optimizer holds the patch",
        PASS if in_opt else FAIL,
        "patch.pixels in optimizer.param_groups"
        if in_opt
        else "the optimizer does not update the patch",
        "backward",
    )


def _first_forward(report: Report, trainer: PatchTrainer) -> None:
    """One forward + gradient analysis, outside the loop (the loop repeats it)."""
    from ..data import batch_indices, batches

    cfg = trainer.config
    _, images, labels = next(
        iter(
            batches(trainer.data, cfg.data.batch_size, seed=cfg.train.seed, start=trainer.iteration)
        )
    )
    if not image_check(report, "training images", images, CLASSIFIER_RANGE):
        raise _Stop
    before = {name: m.processor for name, m in attention_modules(trainer.parts.denoiser)}
    indices = batch_indices(
        len(trainer.data), cfg.data.batch_size, trainer.iteration, seed=cfg.train.seed
    )
    try:
        fwd = trainer.forward(images, labels, indices)
    except AttnPatchError as e:  # classified by type, and by what the pipeline recorded
        msg = str(e)
        if isinstance(e, HookError) or _nothing_recorded(trainer, images, labels):
            report.add("hijack during denoising", FAIL, "no attention maps were recorded", "hijack")
        elif isinstance(e, (ImageLayoutError, ImageRangeError)):  # a check inside the pipeline
            cause = "layout" if isinstance(e, ImageLayoutError) else "range"
            report.add("images inside the pipeline", FAIL, msg[:110], cause)
        else:
            report.add("forward pass", FAIL, msg[:140], "grad_flow")
        raise _Stop from None
    image_check(report, "classifier input", fwd.patched, CLASSIFIER_RANGE)
    res = fwd.attention
    if res is not None:
        image_check(report, "diffusion input", res.diffusion_input, DIFFUSION_RANGE)
        k = trainer.attention.num_steps
        steps = res.cross.num_steps
        ok = steps == k
        report.add(
            "hijack during denoising",
            PASS if ok else FAIL,
            f"maps recorded at {steps} {_net(trainer)} calls (denoising runs {k})",
            "hijack",
        )
    after = {name: m.processor for name, m in attention_modules(trainer.parts.denoiser)}
    restored = not is_hijacked(trainer.parts.denoiser) and all(
        after[k] is before[k] for k in before
    )
    report.add(
        "hijack removed after the maps",
        PASS if restored else FAIL,
        f"{len(before)} processors are the originals"
        if restored
        else "controlled processors left installed",
        "remove_hijack",
    )
    gradient_flow(report, trainer, fwd)
    names = [n for n, v in fwd.terms.as_dict().items() if v is not None and n != "total"]
    report.add(
        "loss terms logged separately",
        PASS if names else FAIL,
        ", ".join(names) or "none",
        "losses",
    )


def _nothing_recorded(trainer: PatchTrainer, images: torch.Tensor, labels: torch.Tensor) -> bool:
    """Whether the attention pipeline, run once more, records no map at all (the denoising
    ran outside the hijack)."""
    if trainer.attention is None:
        return False
    try:
        with torch.no_grad():
            result = trainer.attention(images, trainer.class_embeds.take(labels))
    except AttnPatchError:
        return False
    return result.cross.num_steps == 0 and result.self_store.num_steps == 0


def _net(trainer: PatchTrainer) -> str:
    """What the report calls the denoiser: "UNet" or "transformer"."""
    return "transformer" if trainer.parts.is_dit else "UNet"


class _Stop(Exception):
    """A check failed in a way that makes the following ones meaningless."""


def _loop_checks(report: Report, trainer: PatchTrainer, n: int, K: int) -> None:
    obs = _Observer(trainer)
    hooks = [
        ("forward", obs.on_forward),
        ("backward", obs.on_backward),
        ("iteration", obs.on_iteration),
    ]
    for event, fn in hooks:
        trainer.hooks[event].append(fn)
    cfg = trainer.config.train
    old = (cfg.iterations, cfg.checkpoint_every, trainer.out_dir)
    cfg.iterations, cfg.checkpoint_every, trainer.out_dir = trainer.iteration + n, 0, None
    try:
        trainer.train(progress=False)
    except (RuntimeError, AttnPatchError) as e:
        if not trainer.patch.pixels.requires_grad:
            report.add("loss.backward()", FAIL, "the total loss has no gradient", "requires_grad")
        else:
            report.add("training loop", FAIL, str(e)[:140], "backward")
        return
    finally:
        cfg.iterations, cfg.checkpoint_every, trainer.out_dir = old
        for event, fn in hooks:
            trainer.hooks[event].remove(fn)
    # the counter: 1, 2, ..., K-1, 0, 1, ...
    start = obs.counters[0] - 1 if obs.counters else 0
    expected = [(start + i + 1) % K for i in range(n)]
    report.add(
        "accumulation counter",
        PASS if obs.counters == expected else FAIL,
        f"{obs.counters} (K={K})",
        "counter",
    )
    # backward every iteration: the gradient grows (or appears) at each backward
    changed = obs.backward_changed
    norms = ", ".join(
        f"{b:.2g}/{a:.2g}" for b, a in zip(obs.grad_before_backward, obs.grad_after_backward)
    )
    if all(changed):
        status, value = PASS, f"|grad| before/after backward: {norms}"
    elif any(changed):  # a zero-gradient iteration (e.g. a CW loss past its margin) can be fine
        idle = [i for i, c in enumerate(changed) if not c]
        status, value = WARN, f"backward added nothing at iteration(s) {idle}; |grad| {norms}"
    else:
        status, value = FAIL, "no backward() changed the patch's gradient"
    report.add("loss.backward() every iteration", status, value, "backward")
    # zero_grad only right after a step: the gradient survives between steps
    zeroed = [
        i
        for i, c in enumerate(obs.counters)
        if i > 0 and obs.counters[i - 1] != 0 and obs.grad_before_backward[i] == 0
    ]
    report.add(
        "gradient accumulates until the step",
        FAIL if zeroed else PASS,
        f"gradient zeroed before iteration(s) {zeroed}"
        if zeroed
        else "kept between steps, cleared after each",
        "zero_grad",
    )
    right = [changed == stepped for changed, stepped in zip(obs.patch_changed, obs.stepped)]
    steps_at = [i for i, s in enumerate(obs.stepped) if s]
    changed_at = [i for i, c in enumerate(obs.patch_changed) if c]
    report.add(
        "patch changes exactly at the steps",
        PASS if all(right) and steps_at else FAIL,
        f"steps at {steps_at}, patch changed at {changed_at}",
        "backward" if not changed_at else "counter",
    )
    for name in [k for k in obs.terms[0] if k != "total"]:
        values = [t[name] for t in obs.terms if t.get(name) is not None]
        if not values:
            continue
        varies = max(values) - min(values) > 1e-12 * max(1.0, abs(values[0]))
        report.add(
            f"loss {name}",
            PASS if varies else FAIL,
            " -> ".join(f"{v:.4g}" for v in (values[0], values[-1]))
            + ("" if varies else " (constant)"),
            "grad_flow",
        )


def _snapshot(trainer: PatchTrainer) -> dict[str, Any]:
    return {"pixels": trainer.patch.pixels.detach().clone(), "state": trainer.state_dict()}


def _restore(trainer: PatchTrainer, saved: dict[str, Any]) -> None:
    with torch.no_grad():
        trainer.patch.pixels.copy_(saved["pixels"])
    trainer.load_state_dict(saved["state"])


def doctor(config: Any, *, iterations: int | None = None) -> Report:
    """Build the configured pipeline (no run folder is written) and :func:`diagnose` it."""
    from .run import build_trainer

    _iterations(iterations, config.train.accumulate)  # before the models load
    with num_threads(config.train.threads):
        trainer, _ = build_trainer(config, out_dir=None)
        return diagnose(trainer, iterations=iterations)
