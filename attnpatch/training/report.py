"""The doctor's report: one line per check (PASS / FAIL / WARN, the measured value), and for
every failure the class of bug it points to with its fix.

The failure classes are those of the project's pipeline checklist (docs/doctor.md): a loss that
does not change points to gradient flow, the hijack or ``requires_grad``; a patch that does not
update points to a zeroed gradient, a missing ``backward()`` or the accumulation counter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ImageLayoutError, ImageRangeError
from ..images import check_image

__all__ = ["PASS", "FAIL", "WARN", "CAUSES", "Check", "Report", "image_check", "grad_norm"]

PASS, FAIL, WARN = "PASS", "FAIL", "WARN"

#: Failure class -> (the symptom and what to check, the fix).
CAUSES = {
    "grad_flow": ("loss doesn't change: check grad flow", "remove .detach()/no_grad on this path"),
    "hijack": (
        "loss doesn't change: check hijack hook",
        "run ddim_denoise inside `with hijack(unet, store):`",
    ),
    "requires_grad": (
        "loss doesn't change: check requires_grad",
        "keep patch.pixels.requires_grad True (it is the parameter)",
    ),
    "zero_grad": (
        "patch doesn't update: check gradient zero",
        "call optimizer.zero_grad() only right after optimizer.step()",
    ),
    "backward": (
        "patch doesn't update: check loss backward",
        "call loss.backward() every iteration",
    ),
    "counter": (
        "patch doesn't update: check counter update",
        "counter += 1 each iteration; step and reset it when it reaches K",
    ),
    "range": (
        "check image range [-1, 1] in diffusion pipeline",
        "classifier side [0, 1]; to_diffusion_input() maps to [-1, 1]",
    ),
    "layout": (
        "check RGB and CHW in classifier and diffusion pipeline",
        "pass (B, 3, H, W) RGB: x.permute(0, 3, 1, 2) for channels-last",
    ),
    "remove_hijack": (
        "REMOVE hijack after attention map calculation",
        "use `with hijack(...)`, which restores the processors on exit",
    ),
    "frozen": (
        "frozen models must get no gradient",
        "model.eval().requires_grad_(False) for classifier, UNet, VAE, text encoder",
    ),
    "losses": (
        "print three kinds of loss separately",
        "add each term to LossTerms under its own name",
    ),
}


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str
    value: str
    cause: str = ""

    def line(self) -> str:
        text = f"{self.status}  {self.name:<42} {self.value}"
        if self.status != PASS and self.cause in CAUSES:
            why, fix = CAUSES[self.cause]
            text += f"\n      -> likely cause: {why}. Fix: {fix}."
        return text


@dataclass
class Report:
    """All checks, in order."""

    checks: list[Check] = field(default_factory=list)

    def add(self, name: str, status: str, value: str, cause: str = "") -> Check:
        check = Check(name, status, value, cause)
        self.checks.append(check)
        return check

    def __getitem__(self, name: str) -> Check:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r}; checks: {[c.name for c in self.checks]}")

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    def __str__(self) -> str:
        n = {s: sum(c.status == s for c in self.checks) for s in (PASS, WARN, FAIL)}
        lines = [c.line() for c in self.checks]
        lines.append(f"{n[PASS]} passed, {n[WARN]} warnings, {n[FAIL]} failed")
        return "\n".join(lines)


def grad_norm(t: torch.Tensor | None) -> float:
    """The L2 norm of a gradient as a float; 0 for ``None`` (no gradient)."""
    return 0.0 if t is None else float(t.detach().float().norm())


def _fmt_range(x: torch.Tensor) -> str:
    x = x.detach()
    return f"{tuple(x.shape)} in [{float(x.min()):.3g}, {float(x.max()):.3g}]"


def image_check(
    report: Report, name: str, x: torch.Tensor, value_range: tuple[float, float]
) -> bool:
    """Add a PASS line for an image batch ``x`` that :func:`~attnpatch.check_image` accepts in
    ``value_range``, else a FAIL line (class "layout" or "range"); returns whether it passed."""
    try:
        check_image(x.detach(), value_range, name=name)
    except (ImageLayoutError, ImageRangeError) as e:
        cause = "layout" if isinstance(e, ImageLayoutError) else "range"
        report.add(name, FAIL, str(e).split(";")[0][:110], cause)
        return False
    report.add(name, PASS, _fmt_range(x))
    return True
