"""The adversarial patch: a trainable image with its mask, placement defaults and files.

Conventions (the canonical layout):

* the patch is ``AdversarialPatch.pixels``, an ``nn.Parameter`` of shape ``(1, 3, h, w)``, RGB
  in [0, 1]; its mask is the buffer ``AdversarialPatch.mask``, ``(1, 1, h, w)`` in [0, 1]
  (``"square"``: all ones; ``"circle"``: the ellipse inscribed in the ``h x w`` rectangle, with
  antialiased edges: each value is the pixel's covered area, so ``mask.sum() ≈ pi * h * w / 4``);
* images are ``(B, 3, H, W)`` RGB in [0, 1]; ``patch(images)`` returns the patched batch
  ``(B, 3, H, W)`` in [0, 1] and the placed mask ``(B, 1, H, W)`` in [0, 1];
* **scale**, **position**, the compositing and the randomness are those of
  :mod:`attnpatch.patch.placement` (:func:`~attnpatch.patch.apply_patch`). Sample once with
  :meth:`AdversarialPatch.sample_params` to apply two patches (e.g. the trained one and a
  random-noise control) with identical placements and transforms.

>>> patch = AdversarialPatch(8, shape="circle", init="random", scale=0.5)
>>> images = torch.rand(4, 3, 32, 32)
>>> patched, mask = patch(images)
>>> patched.shape, mask.shape
(torch.Size([4, 3, 32, 32]), torch.Size([4, 1, 32, 32]))
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._util import as_pair, atomic_write
from ..errors import AttnPatchError, ConfigError, DataError, InputError
from ..images import check_image, read_image, resize, to_pil
from ._files import RESAVE, check_pixels, read_metadata
from .eot import EOT
from .placement import (
    PatchParams,
    Position,
    Scale,
    _apply,
    _check_batch,
    _check_params,
    _check_patch,
    _check_position,
    _check_scale,
    sample_boxes,
)

__all__ = ["AdversarialPatch", "patch_mask", "MASK_SHAPES"]

MASK_SHAPES = ("square", "circle")
DEFAULT_SIZE = 16
FORMAT = "attnpatch.AdversarialPatch"
FORMAT_VERSION = 1


def patch_mask(
    shape: str,
    size: int | tuple[int, int],
    *,
    supersample: int = 8,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The mask of a patch: ``(1, 1, h, w)`` in [0, 1].

    ``"square"`` is all ones. ``"circle"`` is the ellipse inscribed in the ``h x w`` rectangle
    (a circle of radius ``h / 2`` when square); each value is the fraction of the pixel inside it,
    estimated on a ``supersample x supersample`` grid of sub-pixel centres, so edges are soft and
    ``mask.sum() ≈ pi * h * w / 4``.

    >>> import math
    >>> m = patch_mask("circle", 32)
    >>> abs(float(m.sum()) - math.pi * 16**2) < 1.0
    True
    """
    h, w = as_pair(size, "size")
    if shape == "square":
        return torch.ones(1, 1, h, w, dtype=dtype)
    if shape != "circle":
        raise InputError(f"mask shape must be one of {MASK_SHAPES}, got {shape!r}")
    s = int(supersample)
    f64 = torch.float64
    ys = (torch.arange(h * s, dtype=f64) + 0.5) / s - 0.5
    xs = (torch.arange(w * s, dtype=f64) + 0.5) / s - 0.5
    dy = (ys - (h - 1) / 2) / (h / 2)
    dx = (xs - (w - 1) / 2) / (w / 2)
    inside = (dy[:, None] ** 2 + dx[None, :] ** 2 <= 1.0).to(f64)
    return inside.reshape(h, s, w, s).mean(dim=(1, 3)).to(dtype)[None, None]


def _initial_pixels(
    init: Any, size: tuple[int, int] | None, generator: torch.Generator | None, dtype: torch.dtype
) -> torch.Tensor:
    """The starting pixels ``(1, 3, h, w)`` in [0, 1] on the CPU, from ``AdversarialPatch``'s
    ``init``; ``size`` (``(h, w)``, ``None``: the init image's own, else 16) resizes an image."""
    if isinstance(init, str) and init in ("gray", "random"):
        h, w = size if size is not None else (DEFAULT_SIZE, DEFAULT_SIZE)
        if init == "gray":
            return torch.full((1, 3, h, w), 0.5, dtype=dtype)
        return torch.rand((1, 3, h, w), generator=generator, dtype=torch.float32).to(dtype)
    if isinstance(init, (str, os.PathLike)):
        path = Path(init)
        if not path.is_file():
            raise DataError(
                f"init must be 'gray', 'random', an image tensor, a PIL image or a path to an "
                f"image file; no file at {str(path)!r}"
            )
        init = read_image(path)  # a clear error for a corrupt file
    if not isinstance(init, torch.Tensor):
        from PIL import Image

        if not isinstance(init, Image.Image):
            raise InputError(
                f"init must be 'gray', 'random', an image tensor (3, h, w) / (1, 3, h, w) in [0, 1], "
                f"a PIL image or a file path, got {init!r}"
            )
        import numpy as np

        array = np.asarray(init.convert("RGB"), dtype=np.float32) / 255.0
        init = torch.from_numpy(array.copy()).permute(2, 0, 1)
    x = init.detach()
    if x.ndim == 3:
        x = x.unsqueeze(0)
    check_image(x, name="init image")
    if x.shape[0] != 1:
        raise InputError(f"init image must be one image (1, 3, h, w), got {tuple(x.shape)}")
    x = x.to(dtype=dtype, device="cpu").clamp(0.0, 1.0)
    if size is not None:
        x = resize(x, size)
    return x.clamp(0.0, 1.0).contiguous()


def _resolve_eot(eot: Any, default: EOT) -> EOT:
    if eot is None:
        return default
    if eot is True:
        return dataclasses.replace(default, enabled=True)
    if eot is False:
        return dataclasses.replace(default, enabled=False)
    if isinstance(eot, EOT):
        return eot
    raise InputError(f"eot must be True, False, None or an EOT(...), got {eot!r}")


class AdversarialPatch(nn.Module):
    """A trainable adversarial patch with its mask and default placement and EOT.

    Args:
        size: patch resolution ``h`` (square) or ``(h, w)``. Default: the init image's size,
            else 16.
        shape: mask shape, ``"square"`` or ``"circle"`` (see :func:`patch_mask`).
        init: ``"gray"`` (0.5 everywhere), ``"random"`` (uniform [0, 1), from ``generator``, else
            torch's global CPU generator), an image tensor ``(3, h, w)`` / ``(1, 3, h, w)`` in
            [0, 1], a PIL image, or an image file path (resized to ``size`` if given).
        scale: default placement scale: ``None`` (own pixel size), a float, or a ``(low, high)``
            range drawn uniformly per image (defined in :mod:`attnpatch.patch.placement`).
        position: default placement: ``"random"``, ``"center"`` or ``(top, left)`` pixels.
        eot: default EOT: ``True`` (:class:`~attnpatch.patch.EOT` defaults), ``False``, or an ``EOT``.
        generator: CPU generator for ``init="random"``.
        dtype: parameter dtype.

    Attributes:
        pixels: ``nn.Parameter`` ``(1, 3, h, w)`` in [0, 1]: the only trainable tensor.
        mask: buffer ``(1, 1, h, w)`` in [0, 1].

    Training step: ``loss.backward(); opt.step(); patch.clamp_()``.

    >>> patch = AdversarialPatch(8, init="gray", position="center", eot=False)
    >>> patched, mask = patch(torch.zeros(1, 3, 16, 16))
    >>> patched[0, 0, 8, 8].item(), mask.sum().item()
    (0.5, 64.0)
    """

    def __init__(
        self,
        size: int | tuple[int, int] | None = None,
        *,
        shape: str = "square",
        init: Any = "gray",
        scale: Scale = None,
        position: Position = "random",
        eot: bool | EOT = True,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if shape not in MASK_SHAPES:
            raise InputError(f"shape must be one of {MASK_SHAPES}, got {shape!r}")
        self.shape = shape
        self.scale = _check_scale(scale)
        self.position = _check_position(position)
        if isinstance(eot, bool):
            eot = EOT(enabled=eot)
        self.eot = _resolve_eot(eot, EOT())
        size = None if size is None else as_pair(size, "size")
        pixels = _initial_pixels(init, size, generator, dtype)
        self.pixels = nn.Parameter(pixels)
        self.register_buffer("mask", patch_mask(shape, self.size, dtype=dtype), persistent=False)
        #: Extra string metadata read by :meth:`load` (written by ``save(..., extra=...)``).
        self.extra: dict[str, str] = {}

    @property
    def size(self) -> tuple[int, int]:
        """The patch's ``(h, w)``."""
        return (int(self.pixels.shape[-2]), int(self.pixels.shape[-1]))

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, shape={self.shape!r}, scale={self.scale!r}, "
            f"position={self.position!r}, eot={self.eot!r}"
        )

    def sample_params(
        self,
        batch_size: int,
        image_size: tuple[int, int],
        *,
        eot: bool | EOT | None = None,
        generator: torch.Generator | None = None,
    ) -> PatchParams:
        """Draw placement (and EOT) for ``batch_size`` images of ``image_size = (H, W)``.

        ``eot``: ``None`` uses ``self.eot``; ``False`` turns it off; ``True`` turns ``self.eot``
        on; an ``EOT`` replaces it. Draws come from ``generator`` (CPU) or torch's global CPU
        generator, placement first, then EOT. Raises :class:`~attnpatch.errors.InputError` before drawing
        anything if the patch cannot fit.
        """
        image_size = as_pair(image_size, "image size")
        boxes = sample_boxes(
            batch_size,
            image_size,
            self.size,
            scale=self.scale,
            position=self.position,
            generator=generator,
        )
        draw = _resolve_eot(eot, self.eot).sample(
            boxes.shape[0], boxes[:, 2:], self.size, generator=generator
        )
        return PatchParams(boxes=boxes, image_size=image_size, patch_size=self.size, eot=draw)

    def forward(
        self,
        images: torch.Tensor,
        *,
        params: PatchParams | None = None,
        eot: bool | EOT | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch a batch: ``(B, 3, H, W)`` in [0, 1] -> ``(patched (B, 3, H, W), mask (B, 1, H, W))``.

        Without ``params`` it samples them (see :meth:`sample_params`); with ``params`` it
        replays them (then ``eot`` and ``generator`` must be left out).
        """
        _check_batch(images)
        _check_patch(images, self.pixels, self.mask)
        if params is None:
            params = self.sample_params(
                images.shape[0], tuple(images.shape[-2:]), eot=eot, generator=generator
            )
        elif eot is not None or generator is not None:
            raise InputError(
                "pass either params (a replay) or eot/generator (a new draw), not both"
            )
        else:
            _check_params(params, images.shape[0], tuple(images.shape[-2:]), self.size)
        return _apply(images, self.pixels, self.mask, params)

    @torch.no_grad()
    def clamp_(self) -> AdversarialPatch:
        """Project the pixels back into [0, 1] in place (call after ``optimizer.step()``).

        Works on ``pixels.data`` under ``no_grad``: the Parameter object, its ``.grad`` and the
        optimizer's state for it are untouched. Raises :class:`~attnpatch.errors.ConfigError` if a step made
        the pixels NaN or Inf (the clamp would hide the divergence).
        """
        if not torch.isfinite(self.pixels).all():
            raise ConfigError(
                "patch pixels contain NaN/Inf after the optimizer step; lower the learning rate "
                "and check the loss terms for NaN (the last finite patch is in the last checkpoint)"
            )
        self.pixels.clamp_(0.0, 1.0)
        return self

    def random_like(self, *, generator: torch.Generator | None = None) -> AdversarialPatch:
        """A uniform-noise patch with the same size, mask, placement and EOT (the control)."""
        other = AdversarialPatch(
            self.size,
            shape=self.shape,
            init="random",
            scale=self.scale,
            position=self.position,
            eot=dataclasses.replace(self.eot),
            generator=generator,
            dtype=self.pixels.dtype,
        ).to(self.pixels.device)
        other.mask.copy_(self.mask)
        return other

    # ------------------------------------------------------------------ files

    def metadata(self) -> dict[str, str]:
        """The string metadata written by :meth:`save`."""
        from .._version import __version__

        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "attnpatch_version": __version__,
            "size": json.dumps(list(self.size)),
            "shape": self.shape,
            "scale": json.dumps(self.scale),
            "position": json.dumps(self.position),
            "eot": json.dumps(self.eot.to_dict()),
        }

    def save(self, path: str | os.PathLike, *, extra: dict[str, str] | None = None) -> Path:
        """Write ``pixels`` ``(1, 3, h, w)`` and ``mask`` ``(1, 1, h, w)`` as safetensors with
        :meth:`metadata`, atomically (a reader sees the old file or the new one); returns ``path``.

        ``extra``: additional string metadata (e.g. the run's config hash), read back by
        :meth:`load` into ``patch.extra``. The file alone is enough to apply the patch later.
        """
        from safetensors.torch import save_file

        meta = self.metadata()
        if extra:
            bad = [k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)]
            if bad:
                raise InputError(f"extra metadata must map str to str; bad keys: {bad}")
            meta["extra"] = json.dumps(dict(extra))
        tensors = {
            "pixels": self.pixels.detach().to("cpu").contiguous(),
            "mask": self.mask.detach().to("cpu").contiguous(),
        }
        path = Path(path)
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, device: str | torch.device = "cpu"
    ) -> AdversarialPatch:
        """Read a patch written by :meth:`save`; pixels, mask and defaults are restored exactly."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise DataError(f"no patch file at {str(path)!r}; pass the patch.safetensors path")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as e:  # safetensors raises its own error types
            raise DataError(
                f"{str(path)!r} is not a readable safetensors file ({e}); pass a file written by "
                f"AdversarialPatch.save"
            ) from e
        if meta.get("format") != FORMAT or "pixels" not in tensors:
            raise DataError(
                f"{str(path)!r} is not an attnpatch patch file (metadata format="
                f"{meta.get('format')!r}); pass a file written by AdversarialPatch.save"
            )
        version = meta.get("format_version", "0")
        if not version.isdigit() or int(version) > FORMAT_VERSION:
            raise DataError(
                f"{str(path)!r} has patch format version {meta['format_version']}, newer than this "
                f"attnpatch understands ({FORMAT_VERSION}); upgrade attnpatch"
            )
        pixels = tensors["pixels"]
        check_pixels(pixels, path)
        fields = read_metadata(meta, path)
        scale, position = fields["scale"], fields["position"]
        try:
            patch = cls(
                tuple(fields["size"]),
                shape=fields["shape"],
                init="gray",
                scale=tuple(scale) if isinstance(scale, list) else scale,
                position=tuple(position) if isinstance(position, list) else position,
                eot=EOT.from_dict(fields["eot"]),
                dtype=pixels.dtype,
            )
        except (AttnPatchError, TypeError, KeyError, ValueError) as e:
            raise DataError(f"{str(path)!r} holds bad patch metadata ({e}); {RESAVE}") from None
        if patch.size != tuple(pixels.shape[-2:]):
            raise DataError(
                f"{str(path)!r}: its metadata says size {patch.size} but its pixels are "
                f"{tuple(pixels.shape)}; {RESAVE}"
            )
        mask = tensors.get("mask")
        if mask is not None and tuple(mask.shape) != tuple(patch.mask.shape):
            raise DataError(
                f"{str(path)!r}: its mask is {tuple(mask.shape)}, the patch "
                f"{tuple(patch.mask.shape)}; {RESAVE}"
            )
        with torch.no_grad():
            patch.pixels.copy_(pixels)
            if mask is not None:
                patch.mask.copy_(mask)
        try:
            patch.extra = json.loads(meta.get("extra", "{}"))
        except ValueError:
            raise DataError(f"{str(path)!r}: its extra metadata is not JSON; {RESAVE}") from None
        return patch.to(device)

    def to_image(self, *, alpha: bool = False):
        """The patch as an 8-bit ``w x h`` PIL image (``RGB``; ``RGBA`` with the mask as alpha if
        ``alpha``), pixels rounded from [0, 1] to 0..255."""
        x = self.pixels.detach().to("cpu", torch.float32)[0]
        if alpha:
            x = torch.cat([x, self.mask.detach().to("cpu", torch.float32)[0]], 0)
        return to_pil(x)
