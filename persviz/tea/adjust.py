"""Test-time embedding adjustment (TEA): the SLERP with norm matching of docs/tea.md §2, Eq. 1/2.

Pure tensor functions; hooking them into a pipeline happens elsewhere.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from types import MappingProxyType
from typing import Mapping

import torch

from persviz.methods import METHODS, REGISTRY

#: Knobs used in the paper's runs, per personalization method (public code: rho = rotation, alpha = scale); each
#: method's module holds its own (persviz.methods: tea_rotation, tea_scale).
DEFAULTS: Mapping[str, Mapping[str, float]] = MappingProxyType(
    {name: MappingProxyType({"rotation": REGISTRY[name].tea_rotation, "scale": REGISTRY[name].tea_scale})
     for name in METHODS})

_PARALLEL_EPS = 1e-6

Pairs = Sequence[tuple[int, int]]


def check_knob(x: float, name: str) -> float:
    """A knob as a float in [0, 1], or a ValueError."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)) or not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1]; got {x!r}. See tea.DEFAULTS for the paper's values.")
    return float(x)


def _vectors(x: torch.Tensor, name: str) -> torch.Tensor:
    """Check one input of slerp_adjust: a real tensor [..., D] with finite values."""
    x = torch.as_tensor(x)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must be shaped [..., D] with D >= 1; got shape {tuple(x.shape)}")
    if x.is_complex():
        raise ValueError(f"{name} is complex ({x.dtype}); pass real embeddings")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf; check the embedding (e.g. a diverged training step)")
    return x


def slerp_adjust(v: torch.Tensor, c: torch.Tensor, rotation: float, scale: float) -> torch.Tensor:
    """Eq. 1: rescale v and c to m = (1 - scale)|v| + scale|c|, then SLERP from v toward c by `rotation`.

    Args:
        v: learned embedding(s) [..., D] (V*); c: class-word embedding(s) [..., D]; the two broadcast.
        rotation: 0 keeps v's direction, 1 gives c's (public code: rho).
        scale: 0 keeps |v|, 1 uses |c| (public code: alpha). Paper defaults: see DEFAULTS.
    Returns the adjusted vectors, broadcast shape, in the inputs' floating dtype (computed in float64).
    Where sin(theta) < 1e-6 the vectors are parallel and the result is (1 - rotation) v' + rotation c'.
    Theta is computed as 2 atan2(|u - w|, |u + w|) for unit u, w: equal to arccos(<u, w>), accurate near 0 and pi.
    """
    rotation, scale = check_knob(rotation, "rotation"), check_knob(scale, "scale")
    v, c = _vectors(v, "v"), _vectors(c, "c")
    if v.shape[-1] != c.shape[-1]:
        raise ValueError(f"v and c must have the same embedding size D; got v {tuple(v.shape)} and c {tuple(c.shape)}")
    try:
        torch.broadcast_shapes(v.shape, c.shape)
    except RuntimeError as err:
        raise ValueError(f"v {tuple(v.shape)} and c {tuple(c.shape)} do not broadcast: {err}") from None
    out_dtype = torch.promote_types(v.dtype, c.dtype)
    if not out_dtype.is_floating_point:
        out_dtype = torch.get_default_dtype()
    v64, c64 = v.to(torch.float64), c.to(device=v.device, dtype=torch.float64)
    vn, cn = v64.norm(dim=-1, keepdim=True), c64.norm(dim=-1, keepdim=True)
    for name, nrm in (("v", vn), ("c", cn)):
        if bool((nrm == 0).any()):
            where = torch.nonzero(nrm[..., 0] == 0)[:3].tolist() if nrm.ndim > 1 else []
            raise ValueError(f"{name} has zero norm{f' at {where}' if where else ''}; its direction is undefined")
    u, w = v64 / vn, c64 / cn
    m = (1.0 - scale) * vn + scale * cn
    theta = 2.0 * torch.atan2((u - w).norm(dim=-1, keepdim=True), (u + w).norm(dim=-1, keepdim=True))
    sin_t = torch.sin(theta)
    parallel = sin_t < _PARALLEL_EPS
    anti = parallel & (theta > math.pi / 2)
    if rotation not in (0.0, 1.0) and bool(anti.any()):
        raise ValueError(
            "v and c point in opposite directions (angle ~ pi), where the SLERP is undefined; "
            "pick another class word for c (or use rotation 0 or 1)"
        )
    v_adj, c_adj = m * u, m * w
    safe = torch.where(parallel, torch.ones_like(sin_t), sin_t)
    slerp = torch.sin((1.0 - rotation) * theta) / safe * v_adj + torch.sin(rotation * theta) / safe * c_adj
    lerp = (1.0 - rotation) * v_adj + rotation * c_adj
    return torch.where(parallel, lerp, slerp).to(out_dtype)


def _ids(x: Sequence[int] | torch.Tensor, name: str) -> list[int]:
    """Token ids as a flat list of ints."""
    if isinstance(x, torch.Tensor):
        if x.ndim != 1:
            raise ValueError(f"{name} must be one prompt's token ids (1-D); got shape {tuple(x.shape)}")
        return [int(t) for t in x.tolist()]
    return [int(t) for t in x]


def align_positions(
    ids_personal: Sequence[int] | torch.Tensor,
    ids_class: Sequence[int] | torch.Tensor,
    placeholder_ids: int | Sequence[int],
    class_id: int,
) -> list[tuple[int, int]]:
    """Pair every position of the personalized prompt with its counterpart in the class prompt.

    The placeholder token(s) pair with the class token; every other token (BOS, context, EOS,
    padding) pairs with the same token in the class prompt. Handles "sks man" -> "man" (the
    placeholder precedes the class word) and "<V*>" -> "man" (it replaces the class word).
    Returns (i_personal, j_class) for every i in order.
    """
    pers, cls = _ids(ids_personal, "ids_personal"), _ids(ids_class, "ids_class")
    if isinstance(placeholder_ids, numbers.Integral):
        ph = [int(placeholder_ids)]
    else:
        ph = _ids(placeholder_ids, "placeholder_ids")
    class_id = int(class_id)
    if not ph:
        raise ValueError("placeholder_ids is empty; pass the token id(s) of the placeholder (e.g. 'sks')")
    if class_id in ph:
        raise ValueError(f"class_id {class_id} is one of the placeholder ids {ph}; pass the class word's own id")
    spans, k = [], 0
    while k <= len(pers) - len(ph):
        if pers[k : k + len(ph)] == ph:
            spans.append(k)
            k += len(ph)
        else:
            k += 1
    if not spans:
        raise ValueError(
            f"placeholder ids {ph} do not occur in ids_personal; tokenize the personalized prompt with the "
            f"tokenizer that has the placeholder added"
        )
    if class_id not in cls:
        raise ValueError(
            f"class_id {class_id} does not occur in ids_class; tokenize the class prompt and pass the class word's id"
        )
    modes = [True, False] if any(s + len(ph) < len(pers) and pers[s + len(ph)] == class_id for s in spans) else [False]
    first_mismatch = ""
    for prefix in modes:
        tokens, groups = _collapse(pers, spans, len(ph), class_id, prefix)
        n = len(tokens)
        if n <= len(cls) and tokens == cls[:n]:
            return sorted((i, j) for j, group in enumerate(groups) for i in group)
        bad = next((j for j in range(min(n, len(cls))) if tokens[j] != cls[j]), min(n, len(cls)))
        first_mismatch = first_mismatch or f"position {bad} of the class prompt"
    raise ValueError(
        f"the personalized prompt without its placeholder does not match the class prompt (first difference at "
        f"{first_mismatch}); the two prompts must be identical apart from the placeholder, e.g. "
        f"'a photo of sks man on a beach' and 'a photo of man on a beach'"
    )


def align_spans(
    ids_personal: Sequence[int] | torch.Tensor,
    ids_class: Sequence[int] | torch.Tensor,
    placeholder_ids: Sequence[int],
    class_ids: Sequence[int],
) -> list[tuple[int, int]]:
    """align_positions for a class word of several tokens (a SentencePiece tokenizer such as Flux's T5 splits
    "teapot" into "▁tea" "pot", and a DreamBooth identifier "sks" into "▁sk" "s"): the class word's tokens
    c_0 ... c_{k-1} are one unit. Token t of the placeholder pairs with c_min(t, k-1) of the class prompt (a longer
    placeholder's extra tokens all pair with the class word's last token); where the placeholder precedes the class
    word ("sks teapot") the class word's own tokens pair with themselves; every other token pairs with the same
    token of the class prompt. A placeholder shorter than the class word that replaces it leaves the class word's
    remaining tokens unpaired (nothing of the personalized prompt sits there), and the personalized prompt's last
    padding positions, past the class prompt's length, unpaired too (left as they are). With k = 1 this is
    align_positions.
    Returns (i_personal, j_class) for every paired i, in order."""
    pers, cls = _ids(ids_personal, "ids_personal"), _ids(ids_class, "ids_class")
    ph, cw = _ids(placeholder_ids, "placeholder_ids"), _ids(class_ids, "class_ids")
    if len(cw) == 1:
        return align_positions(pers, cls, ph, cw[0])
    if not ph or not cw:
        raise ValueError("placeholder_ids and class_ids must each hold at least one token id")
    if ph == cw[: len(ph)] and len(ph) <= len(cw):
        raise ValueError(f"the placeholder's ids {ph} begin the class word's {cw}; pass the class word's own ids")
    spans, k = [], 0
    while k <= len(pers) - len(ph):
        if pers[k: k + len(ph)] == ph:
            spans.append(k)
            k += len(ph)
        else:
            k += 1
    if not spans:
        raise ValueError(f"placeholder ids {ph} do not occur in ids_personal; tokenize the personalized prompt with "
                         "the same tokenizer")
    for prefix in (True, False):
        tokens: list[int] = []
        extra: list[tuple[int, int]] = []  # (personal position, index into tokens) of the placeholder's tokens
        pairs_own: list[tuple[int, int]] = []
        starts, k = set(spans), 0
        while k < len(pers):
            if k in starts:
                follows = pers[k + len(ph): k + len(ph) + len(cw)] == cw
                base = len(tokens)
                extra += [(k + t, base + min(t, len(cw) - 1)) for t in range(len(ph))]
                if not (prefix and follows):
                    tokens += cw  # the placeholder stands for the class word
                k += len(ph)
                continue
            pairs_own.append((k, len(tokens)))
            tokens.append(pers[k])
            k += 1
        n = min(len(tokens), len(cls))  # a placeholder shorter than the class word pushes the padding's end past Lc
        if tokens[:n] == cls[:n]:
            return sorted((i, j) for i, j in pairs_own + extra if j < len(cls))
    raise ValueError(
        "the personalized prompt without its placeholder does not match the class prompt; the two prompts must be "
        "identical apart from the placeholder, e.g. 'a photo of sks teapot on a beach' and 'a photo of teapot on a "
        "beach'")


def _collapse(
    ids: list[int], spans: list[int], length: int, class_id: int, prefix: bool
) -> tuple[list[int], list[list[int]]]:
    """Collapse each placeholder span: merge it into the next token (prefix) or replace it by class_id."""
    tokens: list[int] = []
    groups: list[list[int]] = []
    starts = set(spans)
    k, pending = 0, []
    while k < len(ids):
        if k in starts:
            span = list(range(k, k + length))
            if prefix and k + length < len(ids) and ids[k + length] == class_id:
                pending += span
            else:
                tokens.append(class_id)
                groups.append(span)
            k += length
            continue
        tokens.append(ids[k])
        groups.append(pending + [k])
        pending = []
        k += 1
    return tokens, groups


def _pair_rows(pairs: object, batch: int) -> list[list[tuple[int, int]]]:
    """Pairs for each batch row: one list for all rows, or one list per row."""
    if isinstance(pairs, torch.Tensor):
        pairs = pairs.tolist()
    rows = list(pairs)  # type: ignore[call-overload]
    if not rows:
        return [[] for _ in range(batch)]
    if isinstance(rows[0], (Sequence, torch.Tensor)) and rows[0] and isinstance(rows[0][0], numbers.Integral):
        rows = [rows] * batch
    elif len(rows) != batch:
        raise ValueError(
            f"pairs must be one list of (i, j) for all rows or one list per batch row ({batch}); got {len(rows)} lists"
        )
    return [[(int(i), int(j)) for i, j in row] for row in rows]


def prompt_level_adjust(
    h_personal: torch.Tensor,
    h_class: torch.Tensor,
    rotation: float,
    scale: float,
    pairs: Pairs | Sequence[Pairs] | None = None,
) -> torch.Tensor:
    """Eq. 2: per-position slerp_adjust of personalized hidden states [B, L, D] toward class ones [B or 1, Lc, D].

    Args:
        pairs: (i_personal, j_class) from align_positions, shared by all rows or one list per row;
            positions not listed are returned unchanged. None pairs position k with k (the public
            code's unaligned behaviour, kept for comparison; needs L == Lc).
    """
    h_personal, h_class = torch.as_tensor(h_personal), torch.as_tensor(h_class)
    if h_personal.ndim != 3 or h_class.ndim != 3:
        raise ValueError(
            f"hidden states must be [B, L, D]; got h_personal {tuple(h_personal.shape)} "
            f"and h_class {tuple(h_class.shape)}"
        )
    B, L, D = h_personal.shape
    if h_class.shape[0] not in (1, B) or h_class.shape[2] != D:
        raise ValueError(
            f"h_class {tuple(h_class.shape)} must be [B or 1, Lc, D] with B={B}, D={D} "
            f"as in h_personal {tuple(h_personal.shape)}"
        )
    h_class = h_class.to(h_personal.device).expand(B, -1, -1)
    if pairs is None:
        if h_class.shape[1] != L:
            raise ValueError(
                f"unaligned adjustment (pairs=None) needs equal lengths; got L={L} and Lc={h_class.shape[1]}. "
                f"Pass pairs from align_positions."
            )
        return slerp_adjust(h_personal, h_class, rotation, scale)
    rows = _pair_rows(pairs, B)
    idx = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    Lc = h_class.shape[1]
    for b, row in enumerate(rows):
        for i, j in row:
            if not (0 <= i < L and 0 <= j < Lc):
                raise ValueError(f"pair ({i}, {j}) is out of range for L={L}, Lc={Lc}")
            if mask[b, i]:
                raise ValueError(
                    f"personal position {i} is paired twice in row {b}; each position takes one class position"
                )
            idx[b, i], mask[b, i] = j, True
    idx, mask = idx.to(h_personal.device), mask.to(h_personal.device)
    target = torch.gather(h_class, 1, idx[..., None].expand(B, L, D))
    out = h_personal.clone().to(torch.promote_types(h_personal.dtype, h_class.dtype))
    out[mask] = slerp_adjust(h_personal[mask], target[mask], rotation, scale).to(out.dtype)
    return out
