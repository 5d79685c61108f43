"""The data layer: labelled image sets, a resumable batch order, the synthetic shapes world."""

from .folder import (
    DEFAULT_TEMPLATE,
    IMAGE_EXTENSIONS,
    SHAPE_CLASSES,
    SHAPES,
    ImageFolder,
    ShapesConfig,
    TensorImageDataset,
    batch_indices,
    batches,
    batches_per_epoch,
    prompt_for,
    prompts_for,
    render_shapes,
    shapes_dataset,
    write_image_folder,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "TensorImageDataset",
    "batches",
    "batch_indices",
    "batches_per_epoch",
    "SHAPE_CLASSES",
    "SHAPES",
    "ShapesConfig",
    "shapes_dataset",
    "render_shapes",
    "write_image_folder",
    "prompt_for",
    "prompts_for",
    "DEFAULT_TEMPLATE",
]
