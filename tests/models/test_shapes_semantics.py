"""What the "shapes" stack's attention means (attnpatch/models/shapes_sd.py, shapes_eval.py).

These tests load the shipped weights and read attention through the library's own path (VAE ->
DDIM inversion -> denoising under hijack -> ``store.aggregate``). Each one fails for a bug that
random weights hide: a transposed (h, w), an off-by-one token index, maps from the wrong blocks,
the CFG halves swapped. docs/models.md reports the same measurements with more images.
"""

from __future__ import annotations

import functools

import pytest
import torch

from attnpatch.errors import InputError
from attnpatch.models import load_diffusion
from attnpatch.models.shapes_eval import (
    centre_of_mass,
    heldout_scenes,
    localisation,
    word_maps,
)
from attnpatch.models.shapes_sd import label_mass_ratio
from attnpatch.testing import tiny_sd


@functools.cache
def _shapes():
    return load_diffusion("shapes")


@functools.cache
def _scenes(n=60):
    return heldout_scenes(n, seed=1)


def test_label_mass_ratio_literal_values_and_an_independent_sum():
    maps = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])
    masks = torch.zeros(1, 1, 4, 4)
    masks[..., 2:, :2] = 1.0  # bottom-left quarter
    # mass inside 2/4, share 1/4 -> 2.0
    assert label_mass_ratio(maps, masks).tolist() == [2.0]
    g = torch.Generator().manual_seed(0)
    maps, masks = torch.rand(5, 4, 6, generator=g), torch.rand(5, 1, 8, 12, generator=g)
    small = masks.reshape(5, 4, 2, 6, 2).mean((2, 4))
    expected = (maps * small).sum((1, 2)) / maps.sum((1, 2)) / small.mean((1, 2))
    assert torch.allclose(label_mass_ratio(maps, masks), expected, atol=1e-6)


def test_the_label_word_attends_to_its_object_and_random_weights_do_not():
    ratios = localisation(_shapes(), _scenes())
    assert ratios.median() >= 2.0
    assert (ratios > 1.5).float().mean() >= 0.8
    random = localisation(tiny_sd("sd15"), _scenes())
    assert abs(float(random.median()) - 1.0) < 0.1


@pytest.mark.parametrize("size", [(32, 48), (48, 32)])
def test_non_square_inputs_put_the_attention_in_the_objects_quadrant(size, shapes_checks):
    # A transposed (h, w) anywhere between the processor and aggregate() fails this.
    maps, com, right = shapes_checks.quadrant_hits(_shapes(), size)
    assert maps.shape[-2:] == (size[0] // 4, size[1] // 4)  # latent / 2
    assert right >= 0.9, com


def test_the_words_own_token_beats_its_neighbours():
    # An off-by-one token index reads "a" (before) or the end token (after).
    s = _scenes()
    own = label_mass_ratio(word_maps(_shapes(), s["images"], s["labels"]), s["masks"])
    for offset in (-1, 1):
        other = word_maps(_shapes(), s["images"], s["labels"], offset=offset)
        assert own.median() > label_mass_ratio(other, s["masks"]).median() + 0.5, offset


def test_down_and_up_blocks_agree_on_where_the_object_is():
    s = _scenes()
    down = word_maps(_shapes(), s["images"], s["labels"], places=("down",))
    up = word_maps(_shapes(), s["images"], s["labels"], places=("up",))
    for maps in (down, up):
        assert label_mass_ratio(maps, s["masks"]).median() > 1.5
    gap = (centre_of_mass(down) - centre_of_mass(up)).norm(dim=1)
    assert gap.median() < 0.15


def test_under_cfg_the_conditional_half_localises_and_the_unconditional_does_not(shapes_checks):
    cond, uncond = shapes_checks.cfg_half_ratios(_shapes(), _scenes())
    assert cond.median() >= 2.0
    assert uncond.median() < 1.3 < cond.median() - 0.7


def test_generation_makes_the_prompted_shape(shapes_checks):
    assert shapes_checks.recognition_rate(_shapes()) >= 0.6  # chance is 0.2


def test_bad_half_or_a_missing_cfg_batch_is_refused_before_any_work():

    s = _scenes()
    with pytest.raises(InputError, match="guidance_scale != 1"):
        word_maps(_shapes(), s["images"], s["labels"], half="uncond")
    with pytest.raises(InputError, match="'cond' or 'uncond'"):
        word_maps(_shapes(), s["images"], s["labels"], half="both")
