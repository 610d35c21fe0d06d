"""Where each word looks: cross-attention maps of any StableDiffusionPipeline, personalized or not.

    with attention_maps(pipe, words=["<cat>", "grass"]) as maps:
        images = pipe("a photo of <cat> on grass", generator=g).images
    maps.maps["<cat>"]      # [images, H, W] attention of the word, mean over heads, layers and steps
    maps.shares["<cat>"]    # [images] its share of the attention on the prompt's word tokens
    maps.special            # {"start", "end", "padding"}: [images] shares of the whole mass, reported beside

The collector **wraps** each cross-attention processor (``attn2`` of every transformer block) in place, whatever it
is: diffusers' ``AttnProcessor2_0`` / ``AttnProcessor`` (a peft LoRA lives in their ``to_q``/``to_k`` Linear
layers and is therefore seen), or ``CustomDiffusionAttnProcessor(2_0)`` whose learned K (and Q, with
``train_q_out``) live in the processor. The wrapper calls the original processor unchanged (the generated image
is identical) and, beside it, recomputes softmax(Q Kᵀ · scale) from that processor's own projections (Custom
Diffusion: its ``to_k_custom_diffusion`` when ``train_kv``, ``to_q_custom_diffusion`` when ``train_q_out``;
``attn.norm_cross`` and the attention mask as the processor applies them; scale ``attn.scale`` for the classic
processors, 1/√head_dim for the ``2_0`` ones, as scaled_dot_product_attention uses). Any other processor class is
read as the default one (``attn.to_q``, ``attn.to_k``). The original processors come back on exit, also after an
exception.

What is kept (``keep``):
  * ``"aggregate"`` (default): the conditional half of the classifier-free-guidance batch (diffusers stacks
    [uncond, cond]; with guidance off the whole batch), mean over heads, each layer's map upsampled (bilinear) to
    ``size`` ("latent" or "image") and summed on the fly over layers and sampler steps, then divided by their
    count (DAAM's aggregate); beside it the same mean per own resolution (over the layers at 8×8, 4×4, ...; no
    upsampling), for measures per resolution. Memory: float32 tensors of images × 77 × (H × W + Σ h × w), i.e.
    O(images × tokens × H × W), independent of the number of steps and layers (SD 1.5 at 512², latent size:
    about 1.8 MB an image).
  * ``"all"``: also every (layer, step) map at the layer's own resolution, [77, h, w] each, for one image (the
    widget's timestep and layer sliders): O(layers × steps × 77 × h × w).

Words map to token positions through the pipeline's tokenizer (after ``pipe.maybe_convert_prompt``, so a
multi-vector placeholder ``<v*>`` loaded as ``<v*>``, ``<v*>_1``, ... is one word whose rows are summed; a word of
several BPE tokens is summed too; a word found several times sums every occurrence). The prompt is read from the
pipeline call (``pipe.encode_prompt``) or given as ``prompt=`` (needed when the pipeline is called with
``prompt_embeds``, as TEA's prompt-level mode does). Shares are over the prompt's word tokens only (positions 1..n);
the start token, the end token and the padding are reported in ``special`` as shares of the whole mass.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from persviz.families.base import Pipeline
from persviz.families import text_stack

__all__ = ["AttentionMaps", "FUNCTION_WORDS", "attention_maps", "content_words", "cross_attention_layers",
           "inside_share", "mask_at", "probabilities", "prompt_words", "word_positions"]


@dataclass
class AttentionMaps:
    """What ``attention_maps`` collected; filled when the ``with`` block ends.

    maps: {word: [images, H, W]} the word's attention probability (summed over its token positions), mean over
        heads, layers and steps, at ``resolution``.
    shares: {word: [images]} the word's share of the attention mass on the prompt's word tokens.
    special: {"start", "end", "padding": [images]} their shares of the whole attention mass (not in ``shares``).
    positions: {word: [token positions]} per image (a list, one entry per image).
    """
    words: list[str]
    keep: str
    size: str
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    shares: dict[str, torch.Tensor] = field(default_factory=dict)
    special: dict[str, torch.Tensor] = field(default_factory=dict)
    words_share: Optional[torch.Tensor] = None  # [images] share of the whole mass on the prompt's word tokens
    token_maps: Optional[torch.Tensor] = None  # [images, 77, H, W] the aggregate of every token position
    # {(h, w): [images, 77, h, w]} the same mean taken over the layers of each own resolution only (no upsampling)
    resolution_maps: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    positions: list[dict[str, list[int]]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    resolution: tuple[int, int] = (0, 0)
    n_layers: int = 0
    n_steps: int = 0
    layer_names: list[str] = field(default_factory=list)
    layer_resolutions: list[tuple[int, int]] = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)
    stored: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)  # keep="all"

    def stored_elements(self) -> int:
        """Number of tensor elements held (the aggregate plus, for keep="all", every stored map)."""
        n = self.token_maps.numel() if self.token_maps is not None else 0
        n += sum(t.numel() for t in self.resolution_maps.values())
        return n + sum(t.numel() for t in self.stored.values())

    def word_maps(self, word: str) -> dict[Any, torch.Tensor]:
        """{"all": [images, H, W] the aggregate, (h, w): [images, h, w] the mean over the layers at (h, w)}."""
        if word not in self.words:
            raise KeyError(f"word {word!r} was not collected; collected: {self.words}")
        out: dict[Any, torch.Tensor] = {"all": self.maps[word]}
        for res, m in self.resolution_maps.items():
            out[res] = torch.stack([m[i, pos[word]].sum(0) for i, pos in enumerate(self.positions)])
        return out

    def region_shares(self, word: str, mask: Any) -> dict[Any, torch.Tensor]:
        """{"all" | (h, w): [images]} the share of the word's attention that falls inside ``mask`` (a fractional
        [H, W] or [images, H, W] region, area-averaged to each map's resolution); its leak out of the region is
        1 minus it."""
        return {k: inside_share(m, mask) for k, m in self.word_maps(word).items()}

    def leak(self, word: str, mask: Any) -> dict[Any, torch.Tensor]:
        """{"all" | (h, w): [images]} the share of the word's attention outside ``mask`` (its region): 1 minus
        region_shares."""
        return {k: 1 - v for k, v in self.region_shares(word, mask).items()}

    def layer_map(self, word: str, layer: int, step: int) -> torch.Tensor:
        """[h, w] the word's map in cross-attention layer ``layer`` (index into layer_names) at sampler step
        ``step`` (index into timesteps), mean over heads, at the layer's own resolution (keep="all" only)."""
        if self.keep != "all":
            raise ValueError('per-layer, per-step maps are kept only with attention_maps(..., keep="all")')
        if word not in self.words:
            raise KeyError(f"word {word!r} was not collected; collected: {self.words}")
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range: {self.n_layers} cross-attention layers "
                             f"(0..{self.n_layers - 1}: {self.layer_names})")
        if not 0 <= step < self.n_steps:
            raise IndexError(f"step {step} out of range: {self.n_steps} sampler steps collected "
                             f"(0..{self.n_steps - 1})")
        return self.stored[(layer, step)][self.positions[0][word]].sum(0)

    def view(self, word: str, layer: Optional[int] = None, step: Optional[int] = None, image: int = 0) -> torch.Tensor:
        """[h, w] one image's map of a word: the aggregate (layer and step None), the mean over the layers at one
        sampler step (upsampled to ``resolution``), one layer's mean over the steps (its own resolution) or one
        (layer, step) map; the last three need keep="all". What the widget's sliders show."""
        if word not in self.words:
            raise KeyError(f"word {word!r} was not collected; collected: {self.words}")
        if layer is None and step is None:
            if not 0 <= image < len(self.positions):
                raise IndexError(f"image {image} out of range: {len(self.positions)} images collected")
            return self.maps[word][image]
        if image != 0:
            raise IndexError('per-layer, per-step maps are kept for one image (image 0)')
        if layer is not None and step is not None:
            return self.layer_map(word, layer, step)
        if layer is not None:
            self.layer_map(word, layer, 0)  # the range checks
            return torch.stack([self.layer_map(word, layer, t) for t in range(self.n_steps)]).mean(0)
        self.layer_map(word, 0, step)
        ups = [F.interpolate(self.layer_map(word, i, step)[None, None], size=self.resolution, mode="bilinear",
                             align_corners=False)[0, 0] for i in range(self.n_layers)]
        return torch.stack(ups).mean(0)

    def aggregate_of_stored(self) -> torch.Tensor:
        """[77, H, W] the mean over every stored (layer, step) map, each upsampled to ``resolution`` (keep="all")."""
        if self.keep != "all":
            raise ValueError('stored maps are kept only with attention_maps(..., keep="all")')
        ups = [F.interpolate(m[None], size=self.resolution, mode="bilinear", align_corners=False)[0]
               for m in self.stored.values()]
        return torch.stack(ups).mean(0)


def mask_at(mask: Any, size: tuple[int, int]) -> torch.Tensor:
    """A fractional mask [..., H, W] area-averaged to size (h, w) (each cell: the fraction of it inside)."""
    m = torch.as_tensor(mask).float()
    lead = m.shape[:-2]
    m = m.reshape(-1, 1, *m.shape[-2:])
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.adaptive_avg_pool2d(m, tuple(size))
    return m.reshape(*lead, *size)


def inside_share(attention: torch.Tensor, mask: Any) -> torch.Tensor:
    """[...] the share of each map's mass (attention [..., h, w]) inside the fractional mask ([h', w'] or one per
    map, area-averaged to (h, w))."""
    att = torch.as_tensor(attention).float()
    m = mask_at(mask, tuple(att.shape[-2:]))
    total = att.sum((-2, -1))
    if bool((total <= 0).any()):
        raise ValueError("an attention map without mass has no share inside a region")
    return (att * m).sum((-2, -1)) / total


def cross_attention_layers(unet: Any) -> dict[str, Any]:
    """{name: Attention module} of the UNet's cross-attention layers (``attn2`` in SD), in forward order."""
    out = {name: m for name, m in unet.named_modules()
           if hasattr(m, "processor") and getattr(m, "is_cross_attention", False)}
    if not out:
        raise ValueError(f"{type(unet).__name__} has no cross-attention processors (no attention module with "
                         "is_cross_attention); attention maps need a text-conditioned UNet such as SD's")
    return out


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def word_positions(pipe: Pipeline, prompt: str, words: Sequence[str]) -> dict[str, list[int]]:
    """{word: token positions} of each word in the tokenized prompt (position 0 is the start token); a
    multi-vector placeholder expands to its rows (``pipe.maybe_convert_prompt``). Raises ValueError naming a word
    that is not in the prompt."""
    tok = text_stack(pipe).primary.tokenizer
    convert = getattr(pipe, "maybe_convert_prompt", None)
    conv = (lambda s: convert(s, tok)) if convert is not None else (lambda s: s)  # noqa: E731
    ids = _ids(tok, conv(prompt))[: tok.model_max_length - 2]
    out = {}
    for w in words:
        wid = _ids(tok, conv(w))
        hits = [i for i in range(len(ids) - len(wid) + 1) if wid and ids[i:i + len(wid)] == wid]
        if not hits:
            raise ValueError(f"word {w!r} is not in the prompt {prompt!r} (its words: {prompt.split()})")
        out[w] = [1 + i + j for i in hits for j in range(len(wid))]
    return out


FUNCTION_WORDS = frozenset("a an the of on at in to next with and photo picture".split())


def prompt_words(prompt: str) -> list[str]:
    """The distinct words of a prompt in order ('a <cat> on a red rug.' -> ['a', '<cat>', 'on', 'red', 'rug'])."""
    words = [re.sub(r"^[^\w<]+|[^\w>]+$", "", w) for w in prompt.split()]
    return list(dict.fromkeys(w for w in words if w))


def content_words(prompt: str, drop: frozenset = FUNCTION_WORDS) -> list[str]:
    """prompt_words without the function words ('a photo of <cat> on a red rug' -> ['<cat>', 'red', 'rug'])."""
    return [w for w in prompt_words(prompt) if w.lower() not in drop]


def _n_prompt_tokens(pipe: Pipeline, prompt: str) -> int:
    tok = text_stack(pipe).primary.tokenizer
    convert = getattr(pipe, "maybe_convert_prompt", None)
    text = convert(prompt, tok) if convert is not None else prompt
    return min(len(_ids(tok, text)), tok.model_max_length - 2)


class _Wrapped:
    """The original processor, called unchanged, with the attention probabilities recomputed beside it."""

    def __init__(self, original: Any, collector: "_Collector", index: int):
        self.original, self.collector, self.index = original, collector, index
        # Attention.forward filters cross_attention_kwargs by inspect.signature(processor.__call__): an instance
        # attribute wins that lookup, so the original's parameters are the ones seen (the call itself uses the class's).
        call = self._call

        @functools.wraps(original.__call__)
        def signature_of_the_original(*args, **kwargs):
            return call(*args, **kwargs)
        self.__call__ = signature_of_the_original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return self._call(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)

    def _call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                            attention_mask=attention_mask, **kwargs)
        if encoder_hidden_states is not None:
            half = self.collector.conditional(hidden_states.shape[0])  # only the maps that are kept are computed
            mask = attention_mask[half] if attention_mask is not None and attention_mask.ndim == 3 else attention_mask
            with torch.no_grad():
                self.collector.add(self.index, probabilities(self.original, attn, hidden_states[half],
                                                             encoder_hidden_states[half], mask))
        return out


def probabilities(proc: Any, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                  attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[batch, heads, pixels, tokens] softmax(Q Kᵀ · scale) as processor ``proc`` computes it in layer ``attn``."""
    name = type(proc).__name__
    custom = name.startswith("CustomDiffusion")
    hs = hidden_states
    if not custom:
        if attn.spatial_norm is not None:
            raise ValueError(f"{attn}: spatial_norm needs temb; not an SD cross-attention layer")
        if hs.ndim == 4:
            b, c, h, w = hs.shape
            hs = hs.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hs = attn.group_norm(hs.transpose(1, 2)).transpose(1, 2)
    batch = hs.shape[0]
    enc = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
    if custom and proc.train_q_out:
        q = proc.to_q_custom_diffusion(hs).to(attn.to_q.weight.dtype)
    else:
        q = attn.to_q(hs.to(attn.to_q.weight.dtype) if custom else hs)
    if custom and proc.train_kv:
        k = proc.to_k_custom_diffusion(enc.to(proc.to_k_custom_diffusion.weight.dtype)).to(attn.to_q.weight.dtype)
    else:
        k = attn.to_k(enc)
    heads = attn.heads
    head_dim = k.shape[-1] // heads
    q = q.view(batch, -1, heads, head_dim).transpose(1, 2)
    k = k.view(batch, -1, heads, head_dim).transpose(1, 2)
    if not custom and getattr(attn, "norm_q", None) is not None:
        q = attn.norm_q(q)
    if not custom and getattr(attn, "norm_k", None) is not None:
        k = attn.norm_k(k)
    scale = head_dim ** -0.5 if name.endswith("2_0") else attn.scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, enc.shape[1], batch)
        scores = scores + mask.view(batch, heads, -1, mask.shape[-1]).float()
    return scores.softmax(-1)


class _Collector:
    def __init__(self, pipe: Pipeline, result: AttentionMaps, prompt: Union[str, Sequence[str], None]):
        self.pipe, self.result = pipe, result
        self.prompt = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        self.called_prompts: Optional[list[str]] = None
        self.latent: Optional[tuple[int, int]] = None
        self.step = -1
        self.sum: Optional[torch.Tensor] = None
        self.count = 0
        self.steps_seen: set[int] = set()
        self.layers_seen: dict[int, tuple[int, int]] = {}
        self.by_resolution: dict[tuple[int, int], list] = {}  # (h, w): [sum [n, 77, h, w], count]

    def unet_pre_hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.latent = tuple(sample.shape[-2:])
        self.step += 1
        self.result.timesteps.append(float(t.flatten()[0]) if torch.is_tensor(t) else float(t))

    def grid(self, n_pixels: int) -> tuple[int, int]:
        H, W = self.latent
        f = round(math.sqrt(H * W / n_pixels))
        h, w = -(-H // f), -(-W // f)
        if h * w != n_pixels:
            raise ValueError(f"cannot place {n_pixels} query pixels on a grid of latent {H}x{W}")
        return h, w

    def conditional(self, batch: int) -> slice:
        """The conditional half of a classifier-free-guidance batch (diffusers stacks [uncond, cond]), or all of it."""
        cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False)) and batch % 2 == 0
        return slice(batch // 2, None) if cfg else slice(None)

    def add(self, layer: int, probs: torch.Tensor) -> None:
        if self.latent is None:
            raise RuntimeError("cross-attention ran outside pipe.unet's forward; cannot tell the map's size")
        p = probs  # the conditional half already (see conditional)
        n = p.shape[0]
        m = p.mean(1)  # [n, pixels, tokens], mean over heads
        h, w = self.grid(m.shape[1])
        m = m.transpose(1, 2).reshape(n, m.shape[2], h, w)
        self.layers_seen.setdefault(layer, (h, w))
        own = self.by_resolution.get((h, w))
        if own is None:
            self.by_resolution[(h, w)] = [m.clone(), 1]
        elif own[0].shape == m.shape:
            own[0] += m
            own[1] += 1
        self.steps_seen.add(self.step)
        if self.result.keep == "all":
            if n != 1:
                raise ValueError(f'keep="all" stores the maps of one image; this call generates {n}')
            self.result.stored[(layer, self.step)] = m[0].float().cpu()  # off the GPU: layers x steps of them
        H, W = self.latent
        if self.result.size == "image":
            s = getattr(self.pipe, "vae_scale_factor", 8)
            H, W = H * s, W * s
        up = F.interpolate(m, size=(H, W), mode="bilinear", align_corners=False)
        if self.sum is None:
            self.sum = up
        elif self.sum.shape != up.shape:
            raise ValueError(f"one with-block collects one kind of generation: maps of shape {tuple(up.shape)} "
                             f"after {tuple(self.sum.shape)}")
        else:
            self.sum += up
        self.count += 1

    def encode_prompt_wrapper(self, original):
        sig = inspect.signature(original)

        @functools.wraps(original)
        def encode_prompt(*args, **kwargs):
            bound = sig.bind_partial(*args, **kwargs)
            prompt = bound.arguments.get("prompt")
            per = bound.arguments.get("num_images_per_prompt", 1) or 1
            if prompt is not None:
                prompts = [prompt] if isinstance(prompt, str) else list(prompt)
                self.called_prompts = [p for p in prompts for _ in range(per)]
            return original(*args, **kwargs)
        return encode_prompt

    def finish(self) -> None:
        r = self.result
        if self.sum is None:
            return
        agg = (self.sum / self.count).cpu()  # the results live on the CPU, whatever device generated
        n = agg.shape[0]
        if self.prompt is not None:
            prompts = self.prompt if len(self.prompt) == n else (
                [p for p in self.prompt for _ in range(n // len(self.prompt))] if n % len(self.prompt) == 0 else None)
            if prompts is None:
                raise ValueError(f"{len(self.prompt)} prompts given for {n} images")
        elif self.called_prompts is not None and len(self.called_prompts) == n:
            prompts = self.called_prompts
        else:
            raise ValueError("the pipeline was called without a prompt string (prompt_embeds?): pass "
                             "attention_maps(..., prompt=...) with the prompt the embeddings come from")
        r.prompts = prompts
        r.positions = [word_positions(self.pipe, p, r.words) for p in prompts]
        r.token_maps = agg
        r.resolution_maps = {res: (total / count).cpu() for res, (total, count) in sorted(self.by_resolution.items(),
                                                                                   reverse=True)}
        r.resolution = tuple(agg.shape[-2:])
        r.n_layers, r.n_steps = len(self.layers_seen), len(self.steps_seen)
        order = sorted(self.layers_seen)
        r.layer_resolutions = [self.layers_seen[i] for i in order]
        mass = agg.mean((-2, -1))  # [n, 77]: each position's share of the whole mass (rows sum to 1)
        counts = [_n_prompt_tokens(self.pipe, p) for p in prompts]
        word_mass = torch.stack([mass[i, 1:1 + c].sum() for i, c in enumerate(counts)])
        r.words_share = word_mass
        r.special = {"start": mass[:, 0].clone(),
                     "end": torch.stack([mass[i, 1 + c] for i, c in enumerate(counts)]),
                     "padding": torch.stack([mass[i, 2 + c:].sum() for i, c in enumerate(counts)])}
        for w in r.words:
            r.maps[w] = torch.stack([agg[i, pos[w]].sum(0) for i, pos in enumerate(r.positions)])
            r.shares[w] = torch.stack([mass[i, pos[w]].sum() for i, pos in enumerate(r.positions)]) / word_mass


@contextlib.contextmanager
def attention_maps(pipe: Pipeline, words: Sequence[str], prompt: Union[str, Sequence[str], None] = None,
                   keep: str = "aggregate", size: str = "latent") -> Iterator[AttentionMaps]:
    """Collects the cross-attention maps of the generations run inside the block (see the module docstring).

    Args:
        pipe: a StableDiffusionPipeline (any processors: default, LoRA'd, Custom Diffusion).
        words: the words to map (each must be in the prompt; a placeholder such as ``<cat>`` is one word).
        prompt: the prompt (or one per image); default: the one the pipeline is called with.
        keep: "aggregate" (bounded memory: O(images × 77 × H × W), independent of steps and layers) or "all"
            (also every (layer, step) map at its own resolution; one image).
        size: the aggregate's resolution, "latent" (the UNet's sample) or "image" (× pipe.vae_scale_factor).
    Yields an AttentionMaps, filled when the block ends. The processors are restored on exit, also after an
    exception, and the images are identical to those generated without the collector.
    """
    if keep not in ("aggregate", "all"):
        raise ValueError(f'keep must be "aggregate" or "all", not {keep!r}')
    if size not in ("latent", "image"):
        raise ValueError(f'size must be "latent" or "image", not {size!r}')
    words = list(words)
    if not words:
        raise ValueError("give at least one word")
    if prompt is not None:
        for p in [prompt] if isinstance(prompt, str) else prompt:
            word_positions(pipe, p, words)  # a word not in the prompt fails before the generation
    layers = cross_attention_layers(pipe.unet)
    result = AttentionMaps(words=words, keep=keep, size=size, layer_names=list(layers))
    col = _Collector(pipe, result, prompt)
    saved = []
    hook = pipe.unet.register_forward_pre_hook(col.unet_pre_hook, with_kwargs=True)
    own_encode = vars(pipe).get("encode_prompt")  # an instance attribute someone set before us, if any
    try:
        if hasattr(pipe, "encode_prompt"):
            pipe.encode_prompt = col.encode_prompt_wrapper(pipe.encode_prompt)
        for i, attn in enumerate(layers.values()):
            original = attn.processor
            wrapper = _Wrapped(original, col, i)
            # object.__setattr__: a Custom Diffusion processor (an nn.Module) stays registered in attn._modules
            # (its weights keep moving with .to() and stay in the state dict); the instance attribute shadows it.
            had = "processor" in vars(attn)
            object.__setattr__(attn, "processor", wrapper)
            saved.append((attn, original, wrapper, had))
        yield result
        col.finish()
    finally:
        hook.remove()
        if own_encode is not None:
            pipe.encode_prompt = own_encode
        elif "encode_prompt" in vars(pipe):
            del pipe.encode_prompt
        for attn, original, wrapper, had in saved:
            if vars(attn).get("processor") is wrapper:  # not replaced inside the block
                if had:
                    object.__setattr__(attn, "processor", original)
                else:
                    del attn.__dict__["processor"]
