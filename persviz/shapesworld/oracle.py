"""The attribute oracle: a CNN that reads every ground-truth attribute of a ShapesWorld image.

It is the judge of every experiment: it reads the background and, for each position slot
(left, center, right), the object's shape (or 'none'), color, texture and size."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from persviz.shapesworld.scene import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, TEXTURES

HEADS = {"shape": len(SHAPES) + 1, "color": len(COLORS), "texture": len(TEXTURES), "size": len(SIZES)}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class AttributeOracle(ModelMixin, ConfigMixin):
    """CNN with one classification head per attribute and slot; input: images in [-1, 1], [B,3,32,32]."""

    @register_to_config
    def __init__(self, width: int = 32, image_size: int = 32, hidden: int = 256):
        super().__init__()
        self.features = nn.Sequential(_block(3, width), nn.MaxPool2d(2), _block(width, 2 * width), nn.MaxPool2d(2),
                                      _block(2 * width, 4 * width), nn.MaxPool2d(2), nn.Flatten())
        d = 4 * width * (image_size // 8) ** 2  # the 4x4 map is kept whole: shapes need their layout
        self.background = nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, len(BACKGROUNDS)))
        self.slots = nn.Sequential(nn.Linear(d, len(POSITIONS) * hidden), nn.SiLU())
        self.slot_heads = nn.ModuleDict({k: nn.Linear(hidden, n) for k, n in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict:
        """Logits: {'background': [B,5], 'shape'|'color'|'texture'|'size': [B, 3 slots, classes]}."""
        f = self.features(images)
        out = {"background": self.background(f)}
        slot_f = self.slots(f).view(len(f), len(POSITIONS), -1)  # [B, 3, hidden]
        for k, head in self.slot_heads.items():
            out[k] = head(slot_f)
        return out

    @torch.no_grad()
    def read(self, images, batch_size: int = 256) -> list[dict]:
        """Read images (uint8 [N,H,W,3] array or float tensor in [-1,1]) into attribute dicts:
        {'background': 'gray', 'left': None or {'shape','color','texture','size'}, ...}."""
        x = to_model_input(images)
        self.eval()
        preds = []
        for i in range(0, len(x), batch_size):
            logits = self(x[i:i + batch_size].to(self.device, self.dtype))
            preds.append({k: v.argmax(-1).cpu() for k, v in logits.items()})
        p = {k: torch.cat([b[k] for b in preds]) for k in preds[0]} if preds else {}
        out = []
        for i in range(len(x)):
            r = {"background": BACKGROUNDS[p["background"][i]]}
            for j, pos in enumerate(POSITIONS):
                s = int(p["shape"][i, j])
                r[pos] = None if s == len(SHAPES) else {
                    "shape": SHAPES[s], "color": COLORS[p["color"][i, j]],
                    "texture": TEXTURES[p["texture"][i, j]], "size": SIZES[p["size"][i, j]]}
            out.append(r)
        return out


def to_model_input(images, image_size: Optional[int] = 32) -> torch.Tensor:
    """uint8 [N,H,W,3] (numpy or PIL list) or float [N,3,H,W] in [-1,1] -> float tensor [N,3,H,W] in [-1,1]."""
    if isinstance(images, torch.Tensor) and images.dtype.is_floating_point:
        x = images
    else:
        if isinstance(images, (list, tuple)):
            images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
        arr = np.asarray(images)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"expected images of shape [N,H,W,3], got {arr.shape}")
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if image_size is not None and x.shape[-1] != image_size:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="area")
    return x


def scene_reading(scene) -> dict:
    """What a perfect oracle reads from a rendered scene (same form as AttributeOracle.read)."""
    r = {"background": scene.background}
    slots = scene.slots()
    for pos in POSITIONS:
        o = slots.get(pos)
        r[pos] = None if o is None else {"shape": o.shape, "color": o.color, "texture": o.texture, "size": o.size}
    return r


def check_attributes(named: dict, reading: dict) -> dict:
    """Which attributes named in a caption (caption_from's dict) the reading confirms: {attr: bool}.

    The main object is the present object that best matches the named concept (at the named
    position if one is named); a named second object must stand in another slot."""
    objs = [(pos, o) for pos in POSITIONS if (o := reading[pos]) is not None]
    keys = [k for k in ("shape", "color", "texture", "size") if named.get(k) is not None]
    cands = [(p, o) for p, o in objs if named.get("position") in (None, p)] or objs
    result = {}
    if "background" in named:
        result["background"] = reading["background"] == named["background"]
    if not cands:
        result.update({k: False for k in keys})
        if "position" in named:
            result["position"] = False
        if "second" in named:
            result["second"] = False
        return result
    main_pos, main = max(cands, key=lambda po: sum(po[1][k] == named[k] for k in keys))
    result.update({k: main[k] == named[k] for k in keys})
    if "position" in named:
        result["position"] = main_pos == named["position"]
    if "second" in named:
        color, shape = named["second"]
        result["second"] = any(o["color"] == color and o["shape"] == shape for p, o in objs if p != main_pos)
    return result
