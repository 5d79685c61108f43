"""The doctor's gradient checks on one forward pass: which tensors each active loss term
reaches with a non-zero gradient (the pipeline checklist's "check grad flow"), each term's
share of the update (a term that is logged but does not steer), frozen models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .report import FAIL, PASS, WARN, Report, grad_norm
from .terms import terms
from .trainer import IterationOutputs, PatchTrainer

__all__ = ["gradient_flow", "STEER_SHARE"]


def _models(trainer: PatchTrainer) -> dict[str, torch.nn.Module]:
    parts = trainer.parts
    net = "transformer" if parts.is_dit else "unet"
    models = {"classifier": trainer.classifier, net: parts.denoiser, "vae": parts.vae}
    for i, enc in enumerate(parts.text_encoders):  # SD3 has three
        models[f"text_encoder{'' if i == 0 else f'_{i + 1}'}"] = enc
    return models


def gradient_flow(report: Report, trainer: PatchTrainer, fwd: IterationOutputs) -> None:
    """Which tensors each active loss term reaches, with non-zero gradient."""
    res = fwd.attention
    stages: dict[str, torch.Tensor] = {"patch": trainer.patch.pixels, "patched image": fwd.patched}
    active = [t for t in terms() if trainer.weights[t.name]]
    inputs = fwd.inputs
    term_fns: dict[str, Callable[[], torch.Tensor]] = {
        t.name: (lambda t=t: t.compute(trainer, inputs))
        for t in active
        if res is not None or not t.uses
    }
    uses_attention = {t.name for t in active if t.uses}
    if res is not None:
        stages.update(
            {
                "diffusion input": res.diffusion_input,
                "VAE latent": res.z0,
                "inverted latent": res.zT,
            }
        )
        stages["cross-attention maps"] = inputs.cross_maps(trainer.attention.cross_resolution)
        self_maps = inputs.self_maps()
        if self_maps:  # the first layer's maps stand for all
            stages["self-attention maps"] = next(iter(self_maps.values()))
    expected = {
        "patch": set(term_fns),
        "patched image": set(term_fns),
        "diffusion input": uses_attention,
        "VAE latent": uses_attention,
        "inverted latent": uses_attention,
        "cross-attention maps": {t.name for t in active if "cross" in t.uses},
        "self-attention maps": {t.name for t in active if "self" in t.uses},
    }
    reached: dict[str, dict[str, float]] = {s: {} for s in stages}
    for term, fn in term_fns.items():
        value = fn()
        if not value.requires_grad:
            for s in stages:
                reached[s][term] = 0.0
            continue
        names = [s for s in stages if stages[s].requires_grad]
        grads = torch.autograd.grad(
            value, [stages[s] for s in names], retain_graph=True, allow_unused=True
        )
        for s in stages:
            reached[s][term] = 0.0
        for s, g in zip(names, grads):
            reached[s][term] = grad_norm(g)
    for stage, tensor in stages.items():
        want = expected[stage] & set(term_fns)
        if not want:
            continue
        missing = [t for t in sorted(want) if not reached[stage].get(t)]
        if not tensor.requires_grad:
            report.add(
                f"gradient flow: {stage}",
                FAIL,
                "does not require grad (detached upstream)",
                "requires_grad" if stage == "patch" else "grad_flow",
            )
        elif missing:
            report.add(
                f"gradient flow: {stage}",
                FAIL,
                f"no gradient from {', '.join(missing)}",
                "grad_flow",
            )
        else:
            norms = ", ".join(f"{t} {reached[stage][t]:.2e}" for t in sorted(want))
            report.add(f"gradient flow: {stage}", PASS, f"|grad| {norms}")
    _update_shares(report, trainer, reached["patch"])
    if res is not None:
        # the denoise process itself must be differentiable (the checklist's last item)
        ok = res.denoised.requires_grad
        if ok:
            (g,) = torch.autograd.grad(
                res.denoised.float().square().mean(), [res.zT], retain_graph=True, allow_unused=True
            )
            ok = grad_norm(g) > 0
        report.add(
            "gradient flow: denoised latent",
            PASS if ok else FAIL,
            "d(denoised)/d(inverted latent) is non-zero" if ok else "the denoise loop is detached",
            "grad_flow",
        )
    total = fwd.terms.total()
    if total.requires_grad:
        total.backward()
    leaked = [
        n
        for n, m in _models(trainer).items()
        if any(p.grad is not None or p.requires_grad for p in m.parameters())
    ]
    training = [n for n, m in _models(trainer).items() if m.training]
    if leaked or training:
        value = "; ".join(
            x
            for x in (
                f"weights with grad: {leaked}" if leaked else "",
                f"in train mode: {training}" if training else "",
            )
            if x
        )
        report.add("frozen models", FAIL, value, "frozen")
    else:
        report.add("frozen models", PASS, f"{', '.join(_models(trainer))}: eval, no grad")
    trainer.patch.pixels.grad = None


#: Below this share of the update a term is "logged but does not steer".
STEER_SHARE = 0.02


def _update_shares(report: Report, trainer: PatchTrainer, norms: dict[str, float]) -> None:
    """Each active term's share of the update on this batch (``||w_i g_i|| / sum_j ||w_j g_j||``
    in "sum" mode; in "share" mode the configured share, or 0 where the gradient is 0), and a
    WARN for a term whose weight is not 0 but that does not steer: its share is below
    :data:`STEER_SHARE` ("sum" mode), or its gradient at the patch is 0."""
    mode = trainer.config.weights.mode
    w = trainer.weights
    total_w = sum(w[n] for n in norms)
    if mode == "share":  # the configured shares; a term without gradient cannot take its own
        contrib = {n: (w[n] / total_w if norms[n] > 0 else 0.0) for n in norms}
    else:
        contrib = {n: w[n] * norms[n] for n in norms}
    total = sum(contrib.values())
    shares = {n: (c / total if total > 0 else 0.0) for n, c in contrib.items()}
    text = ", ".join(f"{n} {s:.1%}" for n, s in shares.items())
    low = STEER_SHARE if mode == "sum" else 0.0  # in share mode a small share is a choice
    idle = [n for n, s in shares.items() if s <= low]
    if not idle:
        report.add(f"update shares ({mode} mode)", PASS, text)
        return
    fixes = []
    for n in idle:
        if mode == "sum" and norms[n] > 0:
            others = sum(c for m, c in contrib.items() if m != n)
            # the weight that would give n a quarter of the update on this batch
            fixes.append(f"weights.{n} ~ {others / 3 / norms[n]:.2g} for 25%")
        else:
            fixes.append(f"{n}: its gradient at the patch is 0 (see gradient flow above)")
    fix = "; ".join(fixes)
    if mode == "sum":
        fix += "; or weights.mode share (weights are shares of the update)"
    report.add(
        f"update shares ({mode} mode)",
        WARN,
        f"{text}: {', '.join(idle)} logged but does not steer ({fix})",
    )
