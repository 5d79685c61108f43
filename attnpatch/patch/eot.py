"""Expectation over Transformation (EOT): random physical-world variation of a patch.

An adversarial patch printed and photographed is seen rotated, rescaled, shifted, under
perspective, with another contrast and brightness and with sensor noise. EOT (Athalye et al.
2018) trains the patch on random draws of such transforms so that it survives them. This module
holds the *distribution* (:class:`EOT`, a plain config object that can be saved as JSON), the
*draw* (:class:`EOTDraw`, tensors of one batch's sampled values) and the functional pieces that
apply a draw:

* geometric (rotation, scale, translation, perspective): :func:`eot_matrix` builds one 3x3
  homography per image, in the placed patch's own centred pixel frame;
  :func:`attnpatch.patch.apply_patch` composes it with the placement and warps patch *and* mask
  with it in a single resampling, so the mask always covers exactly the warped patch;
* photometric (contrast, brightness, noise): :func:`photometric` changes the patch pixels only,
  not the image around them (it models printing and lighting of the sticker; augmenting the
  scene is the data pipeline's job).

Randomness: every draw comes from a CPU generator, either the ``generator`` you pass or torch's
global CPU generator (``torch.manual_seed`` / ``torch.get_rng_state``), never from a CUDA
generator, so a run that saves and restores ``torch.get_rng_state()`` resumes bit-exactly and the
draws do not depend on the device. Draw order per call (a term whose range is zero draws
nothing): angle ``(B,)``, scale ``(B,)``, translation ``(B, 2)``, corner offsets ``(B, 4, 2)``,
contrast ``(B,)``, brightness ``(B,)``, noise ``(B, 3, h, w)``.

>>> draw = EOT().sample(2, box_sizes=torch.tensor([[8.0, 8.0], [8.0, 8.0]]), patch_size=(8, 8))
>>> draw.matrix.shape, draw.noise.shape
(torch.Size([2, 3, 3]), torch.Size([2, 3, 8, 8]))
>>> EOT(enabled=False).sample(2, torch.ones(2, 2), (8, 8)).matrix is None
True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from kornia.geometry.transform import get_perspective_transform

from ..errors import InputError

__all__ = ["EOT", "EOTDraw", "eot_matrix", "photometric"]


def _pair(value: Any, name: str) -> tuple[float, float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise InputError(
            f"EOT {name} must be a (low, high) pair, got {value!r}; pass e.g. (0.9, 1.1)"
        )
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(
            f"EOT {name} must be a (low, high) pair of numbers, got {value!r}; pass e.g. (0.9, 1.1)"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0 or low > high:
        raise InputError(
            f"EOT {name} must satisfy 0 < low <= high, got ({low:g}, {high:g}); pass e.g. (0.9, 1.1), "
            f"or (1.0, 1.0) to turn it off"
        )
    return low, high


def _amount(value: Any, name: str, upper: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"EOT {name} must be a number, got {value!r}; pass 0 to turn it off")
    value = float(value)
    if not math.isfinite(value) or value < 0 or value >= upper:
        limit = f" and < {upper:g}" if math.isfinite(upper) else ""
        raise InputError(f"EOT {name} must be >= 0{limit}, got {value:g}; pass 0 to turn it off")
    return value


@dataclass
class EOT:
    """The EOT distribution. All ranges are symmetric and uniform; 0 (or ``(1, 1)``) turns a term off.

    Args:
        enabled: master switch. ``False`` turns every transform off: the patch is placed exactly
            (integer pixel offsets, no resampling unless its scale changes), and the output is a
            deterministic function of the placement.
        degrees: rotation angle uniform in ``[-degrees, degrees]`` about the patch centre
            (adversarial-yolo: 20; Brown et al.: 22.5).
        scale: side-length multiplier uniform in ``[low, high]``, on top of the placement scale.
        translate: shift uniform in ``[-translate, translate]`` times the placed patch's height
            (y) and width (x), per axis; must be < 1, so the patch never leaves the image
            entirely. May move it partly out (it is cropped).
        distortion: perspective; each of the 4 corners moves by uniform
            ``[-distortion, distortion]`` times the half-side, per axis. Must be < 1.
        contrast: multiplier of the patch pixels, uniform in ``[low, high]`` (adversarial-yolo).
        brightness: added to the patch pixels, uniform in ``[-brightness, brightness]``.
        noise: added per pixel and channel, uniform in ``[-noise, noise]`` (adversarial-yolo).

    Defaults suit the 32–64 px images of the embedded demo and match adversarial-yolo's
    photometric ranges; the placement scale range (Brown et al.'s 0.1–1.0) lives on the patch.
    """

    enabled: bool = True
    degrees: float = 20.0
    scale: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.05
    distortion: float = 0.1
    contrast: tuple[float, float] = (0.8, 1.2)
    brightness: float = 0.1
    noise: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise InputError(f"EOT enabled must be True or False, got {self.enabled!r}")
        self.degrees = _amount(self.degrees, "degrees", upper=180.0)
        self.scale = _pair(self.scale, "scale")
        self.translate = _amount(self.translate, "translate", upper=1.0)
        self.distortion = _amount(self.distortion, "distortion", upper=1.0)
        self.contrast = _pair(self.contrast, "contrast")
        self.brightness = _amount(self.brightness, "brightness")
        self.noise = _amount(self.noise, "noise")

    @property
    def geometric(self) -> bool:
        """Whether any geometric transform is on (then placement resamples through a warp)."""
        return self.enabled and (
            self.degrees > 0
            or self.scale != (1.0, 1.0)
            or self.translate > 0
            or self.distortion > 0
        )

    @property
    def photometric(self) -> bool:
        """Whether any photometric transform is on."""
        return self.enabled and (
            self.contrast != (1.0, 1.0) or self.brightness > 0 or self.noise > 0
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` reverses it."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EOT:
        """Build from :meth:`to_dict` output; unknown keys raise :class:`~attnpatch.errors.InputError`."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"unknown EOT keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    def sample(
        self,
        batch_size: int,
        box_sizes: torch.Tensor,
        patch_size: tuple[int, int],
        *,
        generator: torch.Generator | None = None,
    ) -> EOTDraw:
        """Draw one set of transforms per image.

        Args:
            batch_size: ``B``.
            box_sizes: ``(B, 2)`` placed patch ``(height, width)`` in image pixels (before EOT);
                translation and perspective are relative to it.
            patch_size: the patch's own ``(h, w)`` (the noise is drawn at this resolution).
            generator: a CPU :class:`torch.Generator`; ``None`` uses torch's global CPU generator.

        Returns:
            An :class:`EOTDraw` on the CPU; fields of disabled terms are ``None``.
        """
        if generator is not None and generator.device.type != "cpu":
            raise InputError(
                f"EOT draws use a CPU generator (device-independent, resumable), got one on "
                f"{generator.device}; pass torch.Generator() (CPU)"
            )
        draw = EOTDraw()
        if not self.enabled:
            return draw
        B = int(batch_size)
        f64 = torch.float64

        def uniform(shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
            u = torch.rand(shape, generator=generator, dtype=f64)
            return low + (high - low) * u

        if self.geometric:
            zero = torch.zeros(B, dtype=f64)
            angle = (
                uniform((B,), -self.degrees, self.degrees) * (math.pi / 180)
                if self.degrees > 0
                else zero
            )
            scale = uniform((B,), *self.scale) if self.scale != (1.0, 1.0) else zero + 1
            sizes = box_sizes.to(f64).reshape(B, 2)
            shift = (
                uniform((B, 2), -self.translate, self.translate) * sizes.flip(-1)
                if self.translate > 0
                else torch.zeros(B, 2, dtype=f64)
            )
            corners = (
                uniform((B, 4, 2), -self.distortion, self.distortion)
                * (sizes.flip(-1)[:, None] / 2)
                if self.distortion > 0
                else torch.zeros(B, 4, 2, dtype=f64)
            )
            draw.matrix = eot_matrix(angle, scale, shift, corners, sizes)
        if self.photometric:
            if self.contrast != (1.0, 1.0):
                draw.contrast = uniform((B,), *self.contrast)
            if self.brightness > 0:
                draw.brightness = uniform((B,), -self.brightness, self.brightness)
            if self.noise > 0:
                h, w = patch_size
                noise = torch.rand((B, 3, h, w), generator=generator, dtype=torch.float32)
                draw.noise = (noise * 2 - 1) * self.noise
        return draw


@dataclass
class EOTDraw:
    """One batch's sampled EOT values (CPU tensors); ``None`` means the term is off.

    Attributes:
        matrix: ``(B, 3, 3)`` float64 homographies in the placed patch's centred pixel frame
            (origin at the patch centre, x right, y down); see :func:`eot_matrix`.
        contrast: ``(B,)`` multipliers.
        brightness: ``(B,)`` offsets.
        noise: ``(B, 3, h, w)`` per-pixel offsets at the patch's resolution.
    """

    matrix: torch.Tensor | None = None
    contrast: torch.Tensor | None = None
    brightness: torch.Tensor | None = None
    noise: torch.Tensor | None = field(default=None, repr=False)

    @property
    def photometric(self) -> bool:
        return self.contrast is not None or self.brightness is not None or self.noise is not None


def eot_matrix(
    angle: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    corner_offsets: torch.Tensor,
    box_sizes: torch.Tensor,
) -> torch.Tensor:
    """Homographies ``G = T(shift) @ R(angle) @ S(scale) @ P(corner_offsets)``, one per image.

    They act on pixel coordinates centred on the placed patch (origin at its centre, x right,
    y down). ``P`` moves the corners ``(±w/2, ±h/2)`` of the box by ``corner_offsets``
    (a perspective distortion, solved with :func:`kornia.geometry.transform.get_perspective_transform`);
    ``R`` rotates by ``angle`` radians (clockwise on screen for positive angles, since y points
    down); ``S`` scales isotropically; ``T`` shifts by ``shift`` pixels ``(dx, dy)``.

    Args:
        angle: ``(B,)`` radians.
        scale: ``(B,)`` multipliers > 0.
        shift: ``(B, 2)`` pixels, ``(dx, dy)``.
        corner_offsets: ``(B, 4, 2)`` pixels ``(dx, dy)`` for the corners top-left, top-right,
            bottom-right, bottom-left.
        box_sizes: ``(B, 2)`` placed ``(height, width)`` in pixels.

    Returns:
        ``(B, 3, 3)`` float64.

    >>> B = 1
    >>> G = eot_matrix(torch.zeros(B), torch.ones(B), torch.tensor([[2.0, 3.0]]),
    ...                torch.zeros(B, 4, 2), torch.tensor([[8.0, 8.0]]))
    >>> G[0, :2, 2].tolist()
    [2.0, 3.0]
    """
    f64 = torch.float64
    angle, scale = angle.to(f64), scale.to(f64)
    B = angle.shape[0]
    half = box_sizes.to(f64).flip(-1) / 2  # (B, 2) as (w/2, h/2)
    signs = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=f64)
    src = signs[None] * half[:, None]  # (B, 4, 2)
    if bool((corner_offsets != 0).any()):
        P = get_perspective_transform(src, src + corner_offsets.to(f64))
    else:
        P = torch.eye(3, dtype=f64).expand(B, 3, 3)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    A = torch.zeros(B, 3, 3, dtype=f64)
    A[:, 0, 0], A[:, 0, 1], A[:, 1, 0], A[:, 1, 1] = cos, -sin, sin, cos
    A[:, :2, 2] = shift.to(f64)
    A[:, 2, 2] = 1.0
    return A @ P


def photometric(pixels: torch.Tensor, draw: EOTDraw) -> torch.Tensor:
    """Apply a draw's contrast, brightness and noise to patch pixels, then clamp to [0, 1].

    ``y = clamp(contrast * pixels + brightness + noise, 0, 1)``, per image.

    Args:
        pixels: ``(1, 3, h, w)`` or ``(B, 3, h, w)`` in [0, 1].
        draw: an :class:`EOTDraw` whose photometric fields are ``(B,)`` / ``(B, 3, h, w)`` or ``None``.

    Returns:
        ``(B, 3, h, w)`` in [0, 1] (``pixels`` itself when no photometric term is on). Gradients
        are those of the affine map except where the clamp is active: a pixel pushed outside
        [0, 1] by this draw gets no gradient from this draw (other draws still reach it).
    """
    if not draw.photometric:
        return pixels
    y = pixels
    opts = {"device": pixels.device, "dtype": pixels.dtype}
    if draw.contrast is not None:
        y = y * draw.contrast.to(**opts).view(-1, 1, 1, 1)
    if draw.brightness is not None:
        y = y + draw.brightness.to(**opts).view(-1, 1, 1, 1)
    if draw.noise is not None:
        y = y + draw.noise.to(**opts)
    return y.clamp(0.0, 1.0)
