"""Image and text encoders behind one small interface: embed_images / embed_texts -> unit vectors.

Backends: transformers CLIP (ShapesWorld CLIP, CLIP ViT-L/14), open_clip, transformers DINOv2."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from persviz.images import to_pil


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor in older transformers and an output object in newer ones."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class HFClipEvaluator:
    """A transformers CLIPModel with its processor."""

    def __init__(self, model, processor, device: torch.device, dtype: torch.dtype, batch_size: int = 64):
        self.model, self.processor = model.to(device, dtype).eval(), processor
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    @classmethod
    def load(cls, name, device, dtype) -> "HFClipEvaluator":
        from transformers import CLIPModel, CLIPProcessor  # heavy: transformers
        return cls(CLIPModel.from_pretrained(name), CLIPProcessor.from_pretrained(name), device, dtype)

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        """Unit-norm image embeddings [N, D] (float32, CPU)."""
        pil, out = to_pil(images), []
        for i in range(0, len(pil), self.batch_size):
            px = self.processor(images=pil[i:i + self.batch_size], return_tensors="pt").pixel_values
            out.append(_features(self.model.get_image_features(pixel_values=px.to(self.device, self.dtype))).float().cpu())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings [N, D] (float32, CPU)."""
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError("embed_texts takes a non-empty list of strings")
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.processor.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                           return_tensors="pt").to(self.device)
            out.append(_features(self.model.get_text_features(**enc)).float().cpu())
        return F.normalize(torch.cat(out), dim=-1)


class OpenClipEvaluator(HFClipEvaluator):
    """An open_clip model (e.g. ViT-L-14 'openai'), with its transform and tokenizer."""

    def __init__(self, model, preprocess, tokenizer, device, dtype, batch_size: int = 64):
        self.model, self.preprocess, self.tokenizer = model.to(device, dtype).eval(), preprocess, tokenizer
        self.device, self.dtype, self.batch_size = device, dtype, batch_size

    @classmethod
    def load(cls, spec: str, device, dtype) -> "OpenClipEvaluator":
        import open_clip  # heavy: open_clip, for 'open_clip:' models only
        arch, _, pretrained = spec.partition("/")
        model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
        return cls(model, preprocess, open_clip.get_tokenizer(arch), device, dtype)

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        pil, out = to_pil(images), []
        for i in range(0, len(pil), self.batch_size):
            x = torch.stack([self.preprocess(im) for im in pil[i:i + self.batch_size]]).to(self.device, self.dtype)
            out.append(self.model.encode_image(x).float().cpu())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError("embed_texts takes a non-empty list of strings")
        out = [self.model.encode_text(self.tokenizer(list(texts[i:i + self.batch_size])).to(self.device)).float().cpu()
               for i in range(0, len(texts), self.batch_size)]
        return F.normalize(torch.cat(out), dim=-1)


class HFDinoEvaluator:
    """A transformers DINOv2 (or DINO ViT) image encoder; pooling 'mean' of last_hidden_state (TEA code) or 'cls'."""

    def __init__(self, model, processor, device, dtype, pooling: str = "mean", batch_size: int = 64):
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.model, self.processor = model.to(device, dtype).eval(), processor
        self.device, self.dtype, self.pooling, self.batch_size = device, dtype, pooling, batch_size

    @classmethod
    def load(cls, name, device, dtype, pooling: str = "mean") -> "HFDinoEvaluator":
        from transformers import AutoImageProcessor, AutoModel  # heavy: transformers
        return cls(AutoModel.from_pretrained(name), AutoImageProcessor.from_pretrained(name), device, dtype, pooling)

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        """Unit-norm image embeddings [N, D] (float32, CPU)."""
        pil, out = to_pil(images), []
        for i in range(0, len(pil), self.batch_size):
            px = self.processor(images=pil[i:i + self.batch_size], return_tensors="pt").pixel_values
            h = self.model(pixel_values=px.to(self.device, self.dtype)).last_hidden_state
            out.append((h.mean(1) if self.pooling == "mean" else h[:, 0]).float().cpu())
        return F.normalize(torch.cat(out), dim=-1)
