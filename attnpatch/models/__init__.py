"""The model layer: classifiers and diffusion stacks by name, local diffusers folders, tiny models.

* :mod:`.registry` — names -> factories: :func:`load_classifier`, :func:`load_diffusion`,
  :func:`register_classifier`, :func:`register_diffusion`, the built-in ``"tiny*"`` names.
* :mod:`.classifier` — :class:`NormalizedClassifier`, :func:`probe_classifier`, torchvision /
  timm builders, local weights files.
* :mod:`.diffusion` — :func:`load_diffusers_folder`, DDIM conversion, variant detection;
  :mod:`.dit` — SD3 / Flux folders, their checks and flow-matching scheduler.
* :mod:`.tiny` — the tiny offline SD stacks; :mod:`.tiny_dit` — the tiny SD3 and Flux stacks
  (``"tiny-sd3"``, ``"tiny-flux"``); :mod:`.t5_unigram` — a T5-convention tokenizer estimated
  from the shapes captions (all re-exported by :mod:`attnpatch.testing`).
* :mod:`.shapes_sd` — the ``"shapes"`` stack: a tiny SD trained on the shapes world, shipped
  in ``weights/shapes/`` (the embedded default); :mod:`.train_shapes` reproduces it
  (``python -m attnpatch.models.train_shapes --out DIR``); :mod:`.shapes_sd3` /
  :mod:`.train_shapes_sd3` — its SD3 sibling ``"shapes-sd3"``; :mod:`.shapes_eval` measures what
  its attention means.
* :mod:`.shapes_classifier` — the ``"tiny"``, ``"tiny-b"``, ``"tiny-c"`` classifiers: training
  and their cache (:mod:`.tiny_classifiers`: the architectures of the latter two).
* :mod:`.clip_bpe` — :func:`clip_tokenizer`, SD's real CLIP tokenizer built offline from
  open-clip-torch's BPE file (re-exported by :mod:`attnpatch.testing`; the module is not named
  after the function, which would shadow it).
"""

from .classifier import IMAGENET_MEAN, IMAGENET_STD, NormalizedClassifier, probe_classifier
from .clip_bpe import clip_tokenizer
from .diffusion import load_diffusers_folder
from .registry import (
    classifier_names,
    diffusion_names,
    load_classifier,
    load_diffusion,
    register_classifier,
    register_diffusion,
)
from .shapes_classifier import (
    TINY_CLASSIFIER_VERSION,
    TINY_CLASSIFIERS,
    cache_dir,
    tiny_classifier_path,
    train_tiny_classifier,
)
from .shapes_sd import SHAPES_WEIGHTS, label_mass_ratio, load_shapes_sd, shapes_sd
from .shapes_sd3 import SHAPES_SD3_WEIGHTS, load_shapes_sd3, shapes_sd3

__all__ = [
    "NormalizedClassifier",
    "probe_classifier",
    "register_classifier",
    "register_diffusion",
    "load_classifier",
    "load_diffusion",
    "classifier_names",
    "diffusion_names",
    "load_diffusers_folder",
    "train_tiny_classifier",
    "tiny_classifier_path",
    "cache_dir",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TINY_CLASSIFIER_VERSION",
    "TINY_CLASSIFIERS",
    "SHAPES_WEIGHTS",
    "shapes_sd",
    "load_shapes_sd",
    "SHAPES_SD3_WEIGHTS",
    "shapes_sd3",
    "load_shapes_sd3",
    "label_mass_ratio",
    "clip_tokenizer",
]
