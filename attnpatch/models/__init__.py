"""The model layer: classifiers and diffusion stacks by name, local diffusers folders, tiny models."""

from .registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TINY_CLASSIFIER_VERSION,
    NormalizedClassifier,
    cache_dir,
    classifier_names,
    diffusion_names,
    load_classifier,
    load_diffusers_folder,
    load_diffusion,
    register_classifier,
    register_diffusion,
    tiny_classifier_path,
    train_tiny_classifier,
)

__all__ = [
    "NormalizedClassifier",
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
]
