"""Recipes belong to the model family (persviz.families: ``Family.recipes``): SD 1.x the TEA paper's, its embedded
micro-SD ShapesWorld's, SDXL the defaults of diffusers' SDXL example scripts; ``persviz.trainers.recipes.recipe``
stays the thin wrapper callers use. A family defined outside the package supplies its recipes without any change
to the methods."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from persviz.families import FAMILIES, Family, UnsupportedModelError, get_family
from persviz.methods import REGISTRY, get_method
from persviz.trainers.recipes import recipe

TOKENS = {"textual_inversion": "<c>", "dreambooth": "sks", "custom_diffusion": "<c>", "lora_finetune": ""}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_recipe_names_a_method_and_fields_of_its_config(family):
    fam = FAMILIES[family]
    assert set(fam.recipes) | set(fam.embedded_recipes) | set(fam.no_recipe) <= set(REGISTRY)
    assert not set(fam.recipes) & set(fam.no_recipe)
    for name in fam.recipes:
        for embedded in (False, True):
            settings = fam.recipe_settings(REGISTRY[name], embedded)
            cfg = get_method(name, concept_only=False).recipe(TOKENS[name], "dog", embedded, family=fam)
            assert {k: getattr(cfg, k) for k in settings} == settings

def test_sd1_is_the_default_and_the_wrapper_takes_a_family_or_its_name():
    assert get_family() is FAMILIES["sd1"] and get_family("sdxl") is FAMILIES["sdxl"]
    assert recipe("ti", "<v>", "dog", False) == recipe("ti", "<v>", "dog", False, family="sd1") == \
        recipe("ti", "<v>", "dog", False, family=FAMILIES["sd1"])
    with pytest.raises(UnsupportedModelError, match="unknown model family 'sd3'; choose one of sd1, sdxl"):
        recipe("ti", "<v>", "dog", False, family="sd3")


@pytest.mark.parametrize("name,want", [
    # textual_inversion_sdxl.py's argparse defaults (diffusers 58eb52c0): --learning_rate 1e-4, --max_train_steps
    # 5000, --train_batch_size 16, --resolution 512, --save_steps 500, --adam_weight_decay 1e-2, flip_p 0.5
    ("textual_inversion", {"lr": 1e-4, "steps": 5000, "batch_size": 16, "resolution": 512, "save_every": 500,
                           "num_vectors": 1, "weight_decay": 1e-2, "flip_p": 0.5}),
    # train_dreambooth_lora_sdxl.py's: --learning_rate 1e-4, --rank 4, --resolution 1024, --train_batch_size 4,
    # --checkpointing_steps 500, text encoder and prior preservation off, --adam_weight_decay 1e-4; steps: its
    # README's --max_train_steps=500 (the script has no default: one epoch)
    ("dreambooth", {"lr": 1e-4, "rank": 4, "resolution": 1024, "batch_size": 4, "save_every": 500, "steps": 500,
                    "train_text_encoder": False, "prior_preservation": False, "weight_decay": 1e-4,
                    "num_class_images": 100, "class_guidance": 5.0}),
])
def test_sdxl_recipes_are_diffusers_sdxl_scripts_defaults(name, want):
    cfg = recipe(name, TOKENS[name], "dog", False, family="sdxl")
    assert {k: getattr(cfg, k) for k in want} == want
    over = recipe(name, TOKENS[name], "dog", False, family="sdxl", steps=9, resolution=64, num_class_images=3)
    assert (over.steps, over.resolution, over.lr) == (9, 64, want["lr"])


@pytest.mark.parametrize("name", ["custom_diffusion", "lora_finetune"])
def test_a_method_without_an_sdxl_recipe_is_refused_with_a_sentence(name):
    with pytest.raises(UnsupportedModelError, match=f"persviz has no {name} recipe for Stable Diffusion XL \\(.+\\); "
                                                    "train textual_inversion or dreambooth on it"):
        recipe(name, TOKENS[name], "dog", False, family="sdxl")


@dataclass(frozen=True)
class Tiny(Family):
    """A family defined outside the package: its recipes reach every method without touching the methods."""


def test_a_new_family_supplies_its_recipes():
    fam = Tiny("tiny", "Tiny", recipes={"textual_inversion": {"lr": 0.25, "steps": 11}},
               embedded_recipes={"textual_inversion": {"steps": 3}})
    assert (recipe("ti", "<v>", "dog", False, family=fam).lr, recipe("ti", "<v>", "dog", False, family=fam).steps) \
        == (0.25, 11)
    assert recipe("ti", "<v>", "dog", True, family=fam).steps == 3
    with pytest.raises(UnsupportedModelError, match="persviz has no dreambooth recipe for Tiny; train "
                                                    "textual_inversion on it"):
        recipe("dreambooth", "sks", "dog", False, family=fam)
