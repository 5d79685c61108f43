"""The training loop written out by hand from attnpatch's public pieces.

Runs offline on the embedded models in about a minute on a laptop CPU:

    python examples/train_patch.py

Every line of the pipeline is visible: patch + EOT -> classifier -> VAE -> DDIM inversion
(with grad) -> denoising under `hijack` -> attention losses -> gradient accumulation.
"""

import torch

import attnpatch as ap
from attnpatch.data import ShapesConfig, batches, shapes_dataset
from attnpatch.diffusion import class_prompt
from attnpatch.hooks import pick_cross_resolution, pick_self_resolutions
from attnpatch.losses import (
    LossTerms,
    classifier_loss,
    cross_attention_variance,
    l2_norm,
    self_attention_structure,
)

torch.manual_seed(0)
# One CPU thread, as `attnpatch train` (train.threads = 1): these tiny models gain nothing from
# more, and several threads per process slow everything down once processes share the cores.
torch.set_num_threads(1)
ACCUMULATE = 4  # optimizer.step() every ACCUMULATE iterations (the accumulation counter)
ITERATIONS = 80
DDIM_SCHEDULE, DDIM_STEPS = 10, 2  # N timesteps in the schedule; the last DDIM_STEPS run
data = shapes_dataset(ShapesConfig(size=32, train_per_class=20, seed=1))
classifier = ap.load_classifier("tiny")  # trained on other synthetic shapes, cached; frozen
sd = ap.load_diffusion("shapes")  # a tiny SD trained on the shapes world (shipped); frozen
prompts = [class_prompt(c) for c in data.classes]  # "a photo of a circle", ...
tokens = [ap.token_indices(sd.tokenizer, p, c) for p, c in zip(prompts, data.classes)]
embeds = ap.encode_prompt(sd.tokenizer, sd.text_encoder, prompts)  # once: (classes, 77, D)

# Ask the library, never hard-code: the VAE's factor and the map sizes the UNet produces.
factor = sd.vae_scale_factor  # 2 for the tiny VAE, 8 for SD
sites = ap.trace_attention(sd.unet, (32 // factor, 32 // factor))
cross_res, self_res = pick_cross_resolution(sites), pick_self_resolutions(sites)

patch = ap.AdversarialPatch(12, init="random", scale=(0.35, 0.45), eot=ap.EOT())
optimizer = torch.optim.Adam(patch.parameters(), lr=0.05)
weights = {"classifier": 1.0, "cross_attention": 1000.0, "self_attention": 100.0, "l2": 0.001}


def attention_maps(images, labels):
    """image -> VAE -> DDIM inversion -> denoise under hijack -> (cross maps, self maps)."""
    x = ap.to_diffusion_input(images, multiple=factor)  # (B, 3, H, W) in [-1, 1]
    z0 = ap.vae_encode(sd.vae, x)
    cond = embeds.take(labels).cond
    steps = dict(num_inference_steps=DDIM_SCHEDULE, num_steps=DDIM_STEPS)
    zT = ap.ddim_invert(sd.unet, sd.scheduler, z0, cond, **steps)
    store = ap.AttentionStore()
    with ap.hijack(sd.unet, store):  # processors installed ...
        ap.ddim_denoise(sd.unet, sd.scheduler, zT, cond, **steps)
    # ... and restored here, before any loss is computed ("REMOVE hijack" in the checklist)
    selfs = {k: v for r in self_res for k, v in store.maps("self", r).items()}
    return store.aggregate("cross", cross_res), selfs


counter = 0  # the iteration counter for gradient accumulation
for it, images, labels in batches(data, 1, seed=0, stop=ITERATIONS):
    patched, mask = patch(images)  # EOT on; patch(images, eot=False) switches it off
    logits = classifier(patched)  # [0, 1] RGB (B, 3, H, W), checked by the classifier
    cross, selfs = attention_maps(patched, labels)
    with torch.no_grad():  # reference structure: the clean image
        _, clean_selfs = attention_maps(images, labels)

    terms = LossTerms(weights)
    terms.add("classifier", lambda: classifier_loss(logits, labels))  # untargeted: -CE
    terms.add(
        "cross_attention", lambda: cross_attention_variance(cross, [tokens[y] for y in labels])
    )
    terms.add("self_attention", lambda: self_attention_structure(selfs, clean_selfs))
    terms.add("l2", lambda: l2_norm(patched, images))
    terms.total().backward()  # every iteration

    counter += 1
    if counter == ACCUMULATE:  # step only when the counter reaches ACCUMULATE ...
        optimizer.step()
        optimizer.zero_grad()  # ... and zero the gradient only right after a step
        patch.clamp_()  # keep the patch in [0, 1]
        counter = 0
    if it % 10 == 0:
        print(f"it {it:3d} | {terms}")  # every loss separately

patch.save("patch.safetensors")
held = shapes_dataset(ShapesConfig(size=32, heldout_per_class=20, seed=1), "heldout")
images, labels = held.get_batch(range(len(held)))
print(ap.evaluate_patch(classifier, patch, images, labels))
