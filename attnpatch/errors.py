"""The library's errors, typed by what the user must fix.

Every error attnpatch raises is an :class:`AttnPatchError` (a :class:`ValueError`); each
subclass names the thing to fix, so code, the CLI and the doctor can branch on the type instead
of the message:

====================  ===============================================================
``ConfigError``       a config file, a ``--section.key`` flag, or an option's value
``DataError``         images, labels, image folders and files, data sets
``InputError``        a tensor or argument handed to a library function (type, shape,
                      dtype, range); for image batches, ``ImageLayoutError`` (not
                      ``(B, C, H, W)`` float RGB) and ``ImageRangeError`` (values
                      outside the expected range, NaN or Inf)
``ModelError``        a model's name, files, loading, or kind (UNet vs transformer)
``RunFolderError``    a run folder or checkpoint: damaged, locked, not the tool's, unwritable
``HookError``         ``hijack`` / controller usage (nesting, replay, recorded state)
``DistributedError``  a data-parallel run's processes: one stalled or died, a
                      collective timed out
====================  ===============================================================

>>> issubclass(ConfigError, AttnPatchError) and issubclass(AttnPatchError, ValueError)
True
"""

from __future__ import annotations

__all__ = [
    "AttnPatchError",
    "ConfigError",
    "DataError",
    "InputError",
    "ModelError",
    "RunFolderError",
    "HookError",
    "DistributedError",
    "ImageLayoutError",
    "ImageRangeError",
]


class AttnPatchError(ValueError):
    """Raised for every problem attnpatch detects in its inputs or state.

    It subclasses :class:`ValueError`, so ``except ValueError`` also catches it. Messages name
    the problem and the fix, e.g. ``"images look channels-last (B, H, W, 3); pass
    images.permute(0, 3, 1, 2)"``. Raise one of the subclasses below, by what the user must fix.
    """


class ConfigError(AttnPatchError):
    """A config file, a command-line flag, or an option's value is wrong: fix the config."""


class DataError(AttnPatchError):
    """Images, labels, an image folder or file, or a data set is wrong: fix the data."""


class InputError(AttnPatchError):
    """A tensor or argument passed to a library function has the wrong type, shape, dtype or
    range: fix the call."""


class ImageLayoutError(InputError):
    """An image batch is not ``(B, C, H, W)`` float RGB: channels-last, another channel count,
    another rank, an integer dtype, or not a tensor (:func:`attnpatch.check_image`)."""


class ImageRangeError(InputError):
    """An image batch's values lie outside the expected range (``[0, 1]`` classifier side,
    ``[-1, 1]`` diffusion side), or are NaN or Inf (:func:`attnpatch.check_image`)."""


class ModelError(AttnPatchError):
    """A model cannot be found or loaded, or is not the kind the call needs: fix the model
    name, its files, or what is passed."""


class RunFolderError(AttnPatchError):
    """A run folder or checkpoint is damaged, locked by another run, not the tool's to
    replace, or cannot be written: fix or choose the folder."""


class HookError(AttnPatchError):
    """``hijack`` or a controller is used in a way that cannot give right maps or gradients:
    fix how the hooks are entered, nested or replayed."""


class DistributedError(AttnPatchError):
    """A data-parallel run's processes cannot go on together: one stopped responding or died,
    and a collective timed out. The message names the process; fix its machine, then resume."""
