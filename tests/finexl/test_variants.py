"""persviz.finexl.variants: the explorer's renderer variants of known level (a stand-in CLIP, no models)."""
import numpy as np
import pytest
import torch

from persviz.finexl.generators import shapesworld_probes
from persviz.finexl.variants import EXPLORER_RATES, explorer_variants, renderer_variant_name, renderer_variants


class MeanColorClip:
    """embed_images: the unit-norm mean RGB and darkness of each image (enough to see 'red' and 'dark')."""

    def embed_images(self, images):
        x = torch.as_tensor(np.asarray(images, dtype=np.float32) / 255.0).mean(dim=(1, 2))
        e = torch.cat([x, 1 - x.mean(dim=1, keepdim=True)], dim=1)
        return torch.nn.functional.normalize(e, dim=-1)


@pytest.fixture(scope="module")
def probes():
    return shapesworld_probes(12, seed=1, p_second=0.0)


def test_names():
    assert renderer_variant_name({"dark": 0.67}) == "renderer dark 0.67"
    assert renderer_variant_name({"large": 0.5, "striped": 1.0}) == "renderer large 0.5 + striped 1"
    with pytest.raises(ValueError):
        renderer_variant_name({})


def test_renderer_variants_know_their_levels_and_move_the_embedding(probes):
    prompts, scenes = probes
    variants, known = renderer_variants(MeanColorClip(), prompts, scenes)
    assert list(variants) == [renderer_variant_name(r) for r in EXPLORER_RATES] == list(known)
    assert known["renderer dark 0.67"] == {"on a black background": 0.67}
    assert set(known["renderer large 0.5 + striped 1"]) == {"large", "striped"}
    for v in variants.values():
        assert v.shape == (4,) and float(v.norm()) > 0
    assert float(variants["renderer dark 0.67"][3]) > 0  # darker images: the darkness coordinate rises
    again, _ = renderer_variants(MeanColorClip(), prompts, scenes)
    assert all(torch.equal(again[k], variants[k]) for k in variants)  # same probes and seed: same V_div


def test_explorer_variants_put_the_users_pair_first(probes):
    prompts, scenes = probes
    v = torch.ones(4)
    only, known = explorer_variants(v, {"red": 1.0}, "LoRA user")
    assert list(only) == ["LoRA user"] and known == {"LoRA user": {"red": 1.0}}
    both, known = explorer_variants(v, {"red": 1.0}, "LoRA x", MeanColorClip(), prompts, scenes,
                                    rates=({"red": 1.0},))
    assert list(both) == ["LoRA x", "renderer red 1"] and known["renderer red 1"] == {"red": 1.0}
    with pytest.raises(ValueError, match="need the clip"):
        explorer_variants(v, {}, "x", scenes=scenes)
    with pytest.raises(ValueError, match="probes but"):
        renderer_variants(MeanColorClip(), prompts[:3], scenes)
