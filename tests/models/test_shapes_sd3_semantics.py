"""What the "shapes-sd3" stack's attention means (attnpatch/models/shapes_sd3.py, shapes_eval.py).

The SD3 mirror of test_shapes_semantics.py. These tests load the shipped weights and read the
joint attention's image-to-text block through the library's own DiT path (VAE -> flow_invert ->
flow_denoise under hijack -> the AttentionStore's "cross" maps). Each one fails for a bug that
random weights hide: a transposed (h, w) token grid, an off-by-one token index (SD3's sequence
is [CLIP (77), T5 (256)]), the CFG halves swapped, maps from the wrong layers.
docs/models.md reports the same measurements with more images
(benchmarks/eval_shapes_sd3.py).
"""

from __future__ import annotations

import functools

import pytest
import torch

from attnpatch.data import SHAPE_CLASSES
from attnpatch.errors import InputError
from attnpatch.models import load_diffusion, shapes_sd3
from attnpatch.models.shapes_eval import (
    dit_maps,
    heldout_scenes,
    localisation,
    word_maps,
)
from attnpatch.models.shapes_sd import label_mass_ratio


@functools.cache
def _shapes():
    return load_diffusion("shapes-sd3")


@functools.cache
def _scenes(n=60):
    return heldout_scenes(n, seed=1)


@functools.cache
def _ratios():
    return localisation(_shapes(), _scenes())


def test_the_label_word_attends_to_its_object_and_the_untrained_stack_does_not():
    ratios = _ratios()
    assert ratios.median() >= 2.0  # the bar (measured: 2.06 on 200 images)
    # LOWER than the UNet stack's 0.8 (which is the xfail below): this stack measures 0.65
    # here and 0.71 on 200 images; 0.6 still fails for maps that ignore the object
    assert (ratios > 1.5).float().mean() >= 0.6
    untrained = localisation(shapes_sd3(seed=0), _scenes())  # same VAE, random transformer
    assert abs(float(untrained.median()) - 1.0) < 0.15


@pytest.mark.xfail(
    strict=True,
    reason="the UNet stack's bar; shapes-sd3 measures 65 % of images above 1.5 here (71 % on "
    "200, docs/models.md): it localises in the median, not in as many images",
)
def test_as_many_images_localise_as_with_the_unet_stack():
    assert (_ratios() > 1.5).float().mean() >= 0.8


@pytest.mark.parametrize("size", [(32, 48), (48, 32)])
def test_non_square_inputs_put_the_attention_in_the_objects_quadrant(size, shapes_checks):
    # A transposed (h, w) anywhere between the processor and the store fails this.
    maps, com, right = shapes_checks.quadrant_hits(_shapes(), size)
    assert maps.shape[-2:] == (size[0] // 4, size[1] // 4)  # latent / patch 2
    assert right >= 0.9, com


def test_the_words_own_token_beats_its_neighbours():
    # An off-by-one token index reads "a" (before) or the end token (after).
    s = _scenes()
    own = _ratios()
    for offset in (-1, 1):
        other = word_maps(_shapes(), s["images"], s["labels"], offset=offset)
        assert own.median() > label_mass_ratio(other, s["masks"]).median() + 0.5, offset


def test_the_t5_copy_of_the_word_says_nothing():
    # SD3's sequence holds the word twice: CLIP (index 5) and T5 (77 + 4). The shapes stack's
    # T5 is zero, so its copy is a padding token like any other: reading it is a wrong index.
    s = _scenes()
    prompts = [f"a photo of a {SHAPE_CLASSES[int(i)]}" for i in s["labels"]]
    maps = dit_maps(_shapes(), s["images"], prompts)
    assert maps.shape == (60, 8, 8, 333)
    t5 = label_mass_ratio(maps[..., 77 + 4], s["masks"])
    clip = label_mass_ratio(maps[torch.arange(60), :, :, 5], s["masks"])
    assert torch.allclose(clip, _ratios())
    assert clip.median() > t5.median() + 0.5


def test_under_cfg_the_conditional_half_localises_and_the_unconditional_does_not(shapes_checks):
    cond, uncond = shapes_checks.cfg_half_ratios(_shapes(), _scenes())
    assert cond.median() >= 2.0
    assert uncond.median() < 1.3 < cond.median() - 0.7


@pytest.fixture(scope="module")
def recognised(shapes_checks) -> float:
    return shapes_checks.recognition_rate(_shapes())  # diffusers' StableDiffusion3Pipeline


def test_generation_makes_the_prompted_shape_more_often_than_chance(recognised):
    # LOWER than the UNet stack's 0.6 (the xfail below): measured 0.375 here, 33 % on 100
    # samples at guidance 3 (docs/models.md); chance is 0.2
    assert recognised >= 0.3


@pytest.mark.xfail(
    strict=True,
    reason="the UNet stack's bar (75 % there); shapes-sd3 generates the prompted shape in "
    "37.5 % of these 40 samples: its attention localises, its samples are poor",
)
def test_generation_makes_the_prompted_shape_as_often_as_the_unet_stack(recognised):
    assert recognised >= 0.6


def test_bad_arguments_are_refused_before_any_work():
    s = _scenes()
    with pytest.raises(InputError, match="guidance_scale != 1"):
        word_maps(_shapes(), s["images"], s["labels"], half="uncond")
    with pytest.raises(InputError, match="'cond' or 'uncond'"):
        word_maps(_shapes(), s["images"], s["labels"], half="both")
    with pytest.raises(InputError, match="multiples of 4"):
        word_maps(_shapes(), torch.rand(1, 3, 30, 32), s["labels"][:1])
    with pytest.raises(InputError, match="no joint layer"):
        word_maps(_shapes(), s["images"][:1], s["labels"][:1], blocks=[99])
