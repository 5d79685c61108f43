"""Hub ids, as diffusers takes them: ``"org/name"``, ``"org/name@revision"``, ``variant="fp16"``.

A diffusion spec that is neither a registered name nor an existing folder, and looks like a
Hugging Face repo id, resolves to a snapshot folder of ``huggingface_hub``'s cache
(``$HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``) through diffusers' own
``DiffusionPipeline.download``: the same files ``from_pretrained`` would fetch (the component
folders ``model_index.json`` names, safetensors, the ``variant``'s weights), read from the cache
when they are there, downloaded when they are not and the hub may be reached.

Offline: ``local_files_only=True``, or the environment variable ``HF_HUB_OFFLINE=1`` (read when
the call is made), uses the cache only; a snapshot that is missing raises
:class:`~attnpatch.errors.ModelError` naming ``hf download`` and the cache path.

torchvision's weights names and timm's ``pretrained=True`` go through their own caches (torch
hub's ``$TORCH_HOME/hub/checkpoints``, and the HF cache for timm) under the same offline switch:
:func:`offline` is the one place that decides.

>>> parse_hub_id("stabilityai/stable-diffusion-2-1-base@main")
('stabilityai/stable-diffusion-2-1-base', 'main')
>>> parse_hub_id("runs/tiny/../x") is None, parse_hub_id("shapes") is None
(True, True)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ModelError

__all__ = [
    "parse_hub_id",
    "offline",
    "hub_cache",
    "repo_cache_folder",
    "diffusion_snapshot",
    "save_to_hub_cache",
]

#: ``org/name`` with an optional ``@revision`` (a branch, tag, commit or ``refs/pr/N``).
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[\w-])(?:@(?P<rev>[\w./-]+))?$")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``"org/name"`` -> ``("org/name", None)``, ``"org/name@rev"`` -> ``("org/name", "rev")``;
    ``None`` for anything that is not a repo id (one slash, no ``..``, no leading ``.``/``/``/``~``)."""
    m = _HUB_ID.match(str(spec))
    if m is None or ".." in m["repo"]:
        return None
    return m["repo"], m["rev"]


def _true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline(local_files_only: bool | None = None) -> bool:
    """Whether to use the caches only: ``local_files_only`` when given, else ``HF_HUB_OFFLINE``
    (or ``TRANSFORMERS_OFFLINE``), as ``huggingface_hub`` read it or as the environment says now.
    """
    if local_files_only is not None:
        return bool(local_files_only)
    from huggingface_hub import constants

    env = _true(os.environ.get("HF_HUB_OFFLINE")) or _true(os.environ.get("TRANSFORMERS_OFFLINE"))
    return bool(constants.HF_HUB_OFFLINE) or env


def hub_cache() -> Path:
    """``huggingface_hub``'s cache folder (``$HF_HUB_CACHE``, default ``$HF_HOME/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def repo_cache_folder(repo_id: str) -> Path:
    """Where ``repo_id``'s snapshots lie: ``<hub cache>/models--org--name``."""
    return hub_cache() / ("models--" + repo_id.replace("/", "--"))


def _download_hint(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {repo_id}{rev}"


def diffusion_snapshot(
    repo_id: str,
    revision: str | None = None,
    *,
    variant: str | None = None,
    local_files_only: bool | None = None,
) -> Path:
    """The cache folder of a diffusers repo at ``revision`` (default: ``main``), downloading the
    pipeline's files when online and they are missing (diffusers' ``DiffusionPipeline.download``:
    component folders, safetensors, ``variant``'s weights).

    Raises :class:`ModelError` when the snapshot is not cached and the hub may not (offline) or
    cannot be reached, naming ``hf download <repo>`` and the cache folder; and for a repo the hub
    does not know or refuses (gated: ``hf auth login``).
    """
    from diffusers import DiffusionPipeline
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    local = offline(local_files_only)
    where = repo_cache_folder(repo_id)
    why = (
        "HF_HUB_OFFLINE is set" if local_files_only is None else "local_files_only=True"
    ) + " and the snapshot is not in the cache"
    try:
        folder = DiffusionPipeline.download(
            repo_id, revision=revision, variant=variant, local_files_only=local
        )
    except GatedRepoError as e:
        raise ModelError(
            f"{repo_id!r} is gated on the Hugging Face hub: accept its licence on its page, log in "
            f"with `hf auth login`, then run `{_download_hint(repo_id, revision)}` ({e})"
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise ModelError(
            f"the Hugging Face hub has no {repo_id!r}"
            + (f" at revision {revision!r}" if revision else "")
            + f" ({type(e).__name__}); check the id, or pass a local diffusers folder"
        ) from e
    except (OSError, ValueError) as e:  # LocalEntryNotFoundError, EnvironmentError, ...
        because = why if local else f"it could not be fetched ({type(e).__name__}: {e})"
        raise ModelError(
            f"diffusion stack {repo_id!r}"
            + (f"@{revision}" if revision else "")
            + f": {because}. Download it once with `{_download_hint(repo_id, revision)}` (into "
            f"{where}), or unset HF_HUB_OFFLINE to let it download, or pass a local diffusers "
            "folder"
        ) from e
    return Path(folder)


def save_to_hub_cache(
    parts,
    repo_id: str,
    *,
    revision: str = "main",
    commit: str | None = None,
    variant: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a stack into a Hugging Face cache as ``hf download`` lays it out, offline: the
    pipeline's ``save_pretrained`` folder (``model_index.json``, ``unet/``, ``vae/``, ...) in
    ``models--org--name/snapshots/<commit>/`` and ``refs/<revision>`` naming the commit. For
    tests and demos; returns the snapshot folder.

    ``parts``: a :class:`~attnpatch.diffusion.DiffusionParts` (SD 1.x / 2.x, or SDXL with its
    second encoder). ``commit`` defaults to a SHA-1 of ``repo_id@revision``; ``variant`` writes
    diffusers' variant files (``diffusion_pytorch_model.fp16.safetensors``) beside any others;
    ``cache_dir`` defaults to :func:`hub_cache`.
    """
    import hashlib

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    common = dict(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer)
    common.update(unet=parts.unet, scheduler=parts.scheduler)
    if parts.text_encoder_2 is not None:
        pipe = StableDiffusionXLPipeline(
            **common, text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2
        )
    else:
        pipe = StableDiffusionPipeline(
            **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    root = Path(cache_dir) if cache_dir is not None else hub_cache()
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = commit or hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    pipe.save_pretrained(snapshot, variant=variant, safe_serialization=True)
    ref = repo / "refs" / revision
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)  # as huggingface_hub writes it: the hash, no newline
    return snapshot
