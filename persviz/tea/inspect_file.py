"""The collapse diagnosis of one embedding file, on one screen (``persviz inspect FILE``).

    report = inspect_embedding("learned_embeds.safetensors", pipe, class_word="dog")
    print(report.to_text())

For every row of the learned token: its norm against the percentiles of the vocabulary's row norms, |V*| / |c| and
cos(V*, c) with the class word, and its nearest vocabulary words by cosine (TEA Sec. 3.2.3, docs/tea.md §4). Any
format persviz.embedding_files reads works; the model is a pipeline, a (tokenizer, text_encoder) pair, or loaded
with ``load_text_model`` (the ShapesWorld model by default, a Hub id or a local folder).

A model of several text encoders (SDXL: clip_l, clip_g) is diagnosed per encoder: ``load_text_stack(model)`` loads
its encoders as its family lays them out, ``inspect_stack(file, stack)`` gives one report per encoder (the file's part
for that encoder against that encoder's vocabulary and class-word row); ``persviz inspect`` uses them.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Union

import torch

from persviz.embedding_files import (SD15, SDXL_PAIR, EmbeddingFile, EmbeddingFileError, an, check_fits,
                                     read_embedding_file, read_embedding_folder, summary)
from persviz.embeddings import class_word_id, norm_ratio_and_cosine, prompt_parts
from persviz.families import UnsupportedModelError, family_of, is_single_file, load_checkpoint
from persviz.loading import default_model, unavailable_error
from persviz.paths import shapesworld_dir
from persviz.tea.adjust import DEFAULTS
from persviz.text_stack import TextEncoder, TextStack

PERCENTILES = (5, 50, 95)
PARTIAL_FORMATS = ("flux-comfyui",)  # formats that may hold some encoders' rows only (ComfyUI's t5xxl alone)
TAIL = 95  # a row norm beyond this percentile of the vocabulary is the norm drift of semantic collapse
LONG = 32  # an embedding with more rows prints its first and last EDGE rows and the statistics of all
EDGE = 8


def load_text_model(model: Union[str, Path, None] = None, device: str | None = None) -> tuple[Any, Any]:
    """(tokenizer, text_encoder) of a Stable Diffusion model, float32, without loading its UNet and VAE.

    model: 'shapesworld' (the default at ShapesWorld scale), a Hub id (SD 1.5 at PERSVIZ_SCALE=full) or a local
    folder with tokenizer/ and text_encoder/."""
    from transformers import CLIPTextModel, CLIPTokenizer  # heavy: transformers

    name = str(model if model is not None else default_model("pipeline"))
    where = shapesworld_dir() / "sd" if name == "shapesworld" else name
    try:
        tokenizer = CLIPTokenizer.from_pretrained(where, subfolder="tokenizer")
        encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise unavailable_error(name, err) from None
    return tokenizer, encoder.to(device or "cpu").eval()


def _model_index(where: Union[str, Path]) -> dict[str, Any]:
    """model_index.json of a diffusers folder or Hub id (from the local cache when offline)."""
    local = Path(where).expanduser()
    if local.is_dir() and not (local / "model_index.json").is_file():  # tokenizer/ and text_encoder/ alone: SD 1.x
        return {"tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder": ["transformers", "CLIPTextModel"]}
    if local.is_dir():
        return json.loads((local / "model_index.json").read_text())
    from huggingface_hub import hf_hub_download  # heavy: huggingface_hub
    return json.loads(Path(hf_hub_download(str(where), "model_index.json")).read_text())


def load_text_stack(model: Union[str, Path, None] = None, device: str | None = None) -> Any:
    """A model's text stack (persviz.text_stack.TextStack, as its family lays it out: SD 1.x clip_l; SDXL clip_l +
    clip_g), float32, without its UNet and VAE; model as load_text_model takes it, or a single-file .safetensors
    checkpoint (loaded whole: its encoders are inside the one file)."""
    import transformers  # heavy: transformers

    name = str(model if model is not None else default_model("pipeline"))
    if is_single_file(name):
        pipe = load_checkpoint(name, device=device or "cpu", dtype=torch.float32)
        return family_of(pipe, name).text_stack(pipe)
    where = shapesworld_dir() / "sd" if name == "shapesworld" else name
    parts = SimpleNamespace()
    try:
        index = _model_index(where)
        for sub, kind in (("tokenizer", "tokenizer"), ("tokenizer_2", "tokenizer"), ("text_encoder", "encoder"),
                          ("text_encoder_2", "encoder")):
            if sub not in index or not index[sub] or index[sub][0] != "transformers":
                continue
            cls = getattr(transformers, index[sub][1])
            loaded = (cls.from_pretrained(where, subfolder=sub) if kind == "tokenizer" else
                      cls.from_pretrained(where, subfolder=sub, dtype=torch.float32).to(device or "cpu").eval())
            setattr(parts, sub, loaded)
    except (OSError, ValueError) as err:  # a missing file or model; json's decode error is a ValueError
        raise unavailable_error(name, err) from None
    try:
        return family_of(parts, name).text_stack(parts)
    except UnsupportedModelError:
        if not hasattr(parts, "text_encoder") or hasattr(parts, "text_encoder_2"):
            raise
        # one CLIP encoder of no family (SD 2.x): its vocabulary is still one to diagnose a file against, as before
        return TextStack((TextEncoder("text_encoder", parts.tokenizer, parts.text_encoder),))


def vocabulary(tokenizer: Any, encoder: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, rows float32 [V, D]) of the tokenizer's own vocabulary (no added tokens such as loaded placeholders)."""
    W = encoder.get_input_embeddings().weight.detach()
    if W.device.type == "meta":
        raise ValueError("the text encoder's weights are on the meta device (sequential offload); load them first")
    n = min(int(getattr(tokenizer, "vocab_size", W.shape[0])), W.shape[0])
    ids = torch.arange(n)
    return ids, W[:n].float().cpu()


def _word(tokenizer: Any, i: int) -> str:
    tok = tokenizer.convert_ids_to_tokens(int(i))
    return tok[: -len("</w>")] if tok.endswith("</w>") else tok


@dataclass(frozen=True)
class RowReport:
    """One row of the learned token."""

    name: str  # token, token_1, ...
    norm: float
    percentile: float  # share of vocabulary rows (in %) with a smaller norm
    ratio: float | None  # |V*| / |c|
    cosine: float | None  # cos(V*, c)
    nearest: tuple[tuple[str, float], ...]  # (word, cosine), best first

    @property
    def in_tail(self) -> bool:
        return self.percentile > TAIL


@dataclass(frozen=True)
class InspectReport:
    """What ``persviz inspect`` prints; ``to_text()`` for the screen, ``to_dict()`` for JSON."""

    file: dict[str, Any]  # persviz.embedding_files.summary
    model: str
    width: int
    vocab_size: int
    vocab_norms: dict[str, float]  # p5, p50, p95, max
    class_word: str | None
    class_norm: float | None
    rows: tuple[RowReport, ...]
    knobs: dict[str, float] = field(default_factory=dict)  # TEA's defaults for the suggestion
    encoder: str = ""  # the text encoder of a file with one part per encoder (SDXL: 'clip_l', 'clip_g'), else ''

    @property
    def broken(self) -> list[str]:
        """The rows holding NaN or Inf: the embedding is broken (a diverged training step)."""
        return [r.name for r in self.rows if not math.isfinite(r.norm)]

    @property
    def collapsed(self) -> bool:
        """A row's norm in the vocabulary's far tail (> p95), the norm drift of semantic collapse."""
        return any(r.in_tail for r in self.rows)

    def _row_line(self, r: RowReport) -> str:
        vn = self.vocab_norms
        if not math.isfinite(r.norm):
            return f"{r.name[:14]:<14} {'NaN/Inf':>8}  (broken row)"
        pct = ">max" if r.norm > vn["max"] else f"p{r.percentile:.0f}"
        line = f"{r.name[:14]:<14} {r.norm:>8.3f} {pct:>6}"
        if self.class_word is not None:
            line += f" {r.ratio:>9.2f} {r.cosine:>10.3f}"
        return line + "  " + ", ".join(f"{w} {c:.2f}" for w, c in r.nearest)

    def _statistics(self) -> list[str]:
        """The statistics of every row, for long embeddings: norms, share in the tail, ratio and cosine."""
        ok = [r for r in self.rows if math.isfinite(r.norm)]
        if not ok:
            return [f"all     {len(self.rows)} rows broken (NaN/Inf)"]
        norms = torch.tensor([r.norm for r in ok], dtype=torch.float64)
        line = (f"all     {len(self.rows)} rows: |V*| min {float(norms.min()):.3f}  median {float(norms.median()):.3f}  "
                f"max {float(norms.max()):.3f}; {sum(r.in_tail for r in ok)} beyond the vocabulary's p{TAIL}")
        if self.class_word is not None:
            ratio = torch.tensor([r.ratio for r in ok], dtype=torch.float64)
            cos = torch.tensor([r.cosine for r in ok], dtype=torch.float64)
            line += (f"; |V*|/|c| median {float(ratio.median()):.2f} (max {float(ratio.max()):.2f}), "
                     f"cos(V*, c) median {float(cos.median()):.3f}")
        return [line]

    def to_dict(self) -> dict[str, Any]:
        encoder = {"encoder": self.encoder} if self.encoder else {}
        return encoder | {"file": self.file, "model": self.model, "width": self.width, "vocab_size": self.vocab_size,
                "vocab_norms": self.vocab_norms, "class_word": self.class_word, "class_norm": self.class_norm,
                "collapsed": self.collapsed, "broken": self.broken,
                "rows": [{"name": r.name, "norm": r.norm, "percentile": r.percentile, "ratio": r.ratio,
                          "cosine": r.cosine, "nearest": [list(x) for x in r.nearest]} for r in self.rows]}

    def to_text(self) -> str:
        f = self.file
        step = f"  step {f['metadata']['step']}" if f["metadata"].get("step") is not None else ""
        vn = self.vocab_norms
        lines = [
            f"file    {f['path']}",
            f"format  {f['format']} ({f['container']})  token {f['token']!r}  {f['rows']} x {f['width']}  "
            f"{f['dtype']}{step}",
            f"tool    {f['tool']}",
            f"model   {self.model or 'the given text encoder'}: text encoder {self.encoder + ' ' if self.encoder else ''}"
            f"{self.width} wide, {self.vocab_size} vocabulary rows",
            "vocab   row norms  " + "  ".join(f"{k} {v:.3f}" for k, v in vn.items()),
        ]
        if self.class_word is not None:
            lines.append(f"class   {self.class_word!r}  |c| = {self.class_norm:.3f}")
        head = f"{'row':<14} {'|V*|':>8} {'pct':>6}"
        if self.class_word is not None:
            head += f" {'|V*|/|c|':>9} {'cos(V*,c)':>10}"
        lines += ["", head + "  nearest words (cosine)"]
        if len(self.rows) > LONG:
            lines += [self._row_line(r) for r in self.rows[:EDGE]]
            lines.append(f"... {len(self.rows) - 2 * EDGE} rows left out (--json lists every row) ...")
            lines += [self._row_line(r) for r in self.rows[-EDGE:]]
            lines += self._statistics()
        else:
            lines += [self._row_line(r) for r in self.rows]
        lines.append("")
        if self.broken:
            lines.append(f"diagnosis: the embedding is broken: {', '.join(self.broken[:8])}"
                         f"{' and more' if len(self.broken) > 8 else ''} hold NaN or Inf values (a diverged training "
                         f"step), so the token cannot be used or fixed; retrain it or take an earlier snapshot")
        elif self.collapsed and self.encoder:
            tail = [r.name for r in self.rows if r.in_tail]
            lines.append(f"diagnosis: in {self.encoder}, the norm of {', '.join(tail[:8])}"
                         f"{' and more' if len(tail) > 8 else ''} lies beyond the vocabulary's p{TAIL} (the norm drift "
                         "of semantic collapse, docs/tea.md §4); `persviz fix FILE --class-word WORD --out FIXED --model MODEL` "
                         "adjusts every encoder's rows, each toward its own encoder's class word")
        elif self.collapsed:
            tail = [r.name for r in self.rows if r.in_tail]
            model = "" if self.model in ("shapesworld", "") else f" --model {self.model}"
            fix = f"persviz fix {Path(f['path']).name} --class-word {self.class_word or 'WORD'} --out FIXED{model}"
            named = ", ".join(tail[:8]) + (f" and {len(tail) - 8} more rows" if len(tail) > 8 else "")
            lines.append(f"diagnosis: the norm of {named} lies beyond the vocabulary's p{TAIL} (the norm drift "
                         f"of semantic collapse, docs/tea.md §4); TEA pulls it back: {fix} "
                         f"(rotation {self.knobs.get('rotation')}, scale {self.knobs.get('scale')})")
        else:
            lines.append(f"diagnosis: every row's norm is within the vocabulary's p{TAIL}; no norm drift")
        return "\n".join(lines)


def inspect_file(f: EmbeddingFile, pipe_or_parts: Any, class_word: str | None = None, k: int = 5,
                 model_name: str = "", part: str = "", pieces: bool = False) -> InspectReport:
    """inspect_embedding for an already read EmbeddingFile; part: the encoder whose part of a per-encoder (SDXL)
    file to diagnose against (tokenizer, text_encoder), its name as the text stack gives it ('clip_g')."""
    tokenizer, encoder = prompt_parts(pipe_or_parts, required=True)
    file = summary(f)
    if part:
        rows = f.parts[part]
        width = int(encoder.get_input_embeddings().weight.shape[-1])
        if rows.shape[-1] != width:
            raise EmbeddingFileError(
                f"{f.path.name}'s {part} part is {rows.shape[-1]} wide but the model's {part} text encoder is {width} "
                f"wide: the embedding was trained on another model; pass the model it was trained on")
        f = replace(f, rows=rows.reshape(-1, rows.shape[-1]), dtype=rows.dtype)
        file |= {"rows": f.n_vectors, "width": f.width, "dtype": str(f.dtype).replace("torch.", "")}
    else:
        check_fits(f, encoder)
    ids, V = vocabulary(tokenizer, encoder)
    norms = V.norm(dim=-1)
    q = torch.quantile(norms.double(), torch.tensor([p / 100 for p in PERCENTILES], dtype=torch.float64))
    vocab_norms = {f"p{p}": float(x) for p, x in zip(PERCENTILES, q)} | {"max": float(norms.max())}
    rows = f.rows.float()
    c = None
    if class_word is not None and pieces:  # a SentencePiece encoder (T5): the mean of the word's rows, as tea()
        ids_c = tokenizer(class_word, add_special_tokens=False)["input_ids"]
        c = encoder.get_input_embeddings().weight.detach()[ids_c].float().mean(dim=0).cpu()
        ratio, cos = norm_ratio_and_cosine(rows, c)
    elif class_word is not None:
        c = encoder.get_input_embeddings().weight.detach()[class_word_id(tokenizer, class_word)].float().cpu()
        ratio, cos = norm_ratio_and_cosine(rows, c)
    special = {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
    keep = torch.tensor([int(i) not in special for i in ids])
    Vn = V / V.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sims = (rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-12)) @ Vn.T
    sims[:, ~keep] = -2.0
    sims = torch.nan_to_num(sims, nan=-2.0)
    top = sims.topk(min(k, int(keep.sum())), dim=-1)
    finite = torch.isfinite(rows).all(dim=-1)
    out = []
    for i, name in enumerate(f.row_names):
        nv = float(rows[i].norm()) if finite[i] else math.nan
        out.append(RowReport(
            name=name, norm=nv, percentile=100.0 * float((norms < nv).double().mean()) if finite[i] else math.nan,
            ratio=None if c is None else float(ratio[i]), cosine=None if c is None else float(cos[i]),
            nearest=() if not finite[i] else
            tuple((_word(tokenizer, ids[j]), float(s)) for s, j in zip(top.values[i], top.indices[i]))))
    return InspectReport(file, model_name, int(V.shape[-1]), int(V.shape[0]),
                         vocab_norms, class_word, None if c is None else float(c.norm()), tuple(out),
                         dict(DEFAULTS["textual_inversion"]), part)


def inspect_stack(f: EmbeddingFile, stack: Any, class_word: str | None = None, k: int = 5,
                  model_name: str = "") -> list[InspectReport]:
    """The diagnosis of a file against every text encoder of a model's text stack (persviz.text_stack.TextStack):
    one report for a one-encoder model, one per encoder (its part of the file, its vocabulary, its class-word row)
    for a model of several (SDXL: clip_l, clip_g); an EmbeddingFileError naming both families when they differ."""
    encoders = list(stack)
    if len(encoders) == 1:
        return [inspect_file(f, (encoders[0].tokenizer, encoders[0].encoder), class_word, k, model_name)]
    names = ", ".join(f"{e.name} {e.width} wide" for e in encoders)
    fam = stack.family_name if hasattr(stack, "family_name") else "SDXL"
    if not f.per_encoder:
        pair = f", or diffusers' folder with {' and '.join(SDXL_PAIR.values())}" if not getattr(stack, "family", "") \
            else ""
        raise EmbeddingFileError(
            f"{f.path.name} holds rows of one text encoder ({f.n_vectors} x {f.width}, a Stable Diffusion 1.x-style "
            f"embedding) but {model_name or 'the model'} is {an(fam)} {fam}-style model with {len(encoders)} text "
            f"encoders ({names}); inspect it against the SD 1.x model it was trained on (e.g. --model {SD15}), or "
            f"pass {an(fam)} {fam} embedding with a part per encoder ({' + '.join(e.name for e in encoders)}{pair})")
    if f.family != fam:
        raise EmbeddingFileError(other_family(f, fam, model_name, names, "inspect"))
    missing = [e.name for e in encoders if e.name not in f.parts]
    if missing and not (set(f.parts) and f.format in PARTIAL_FORMATS):  # ComfyUI's t5xxl alone: T5 diagnosed
        raise EmbeddingFileError(f"{f.path.name} has parts {sorted(f.parts)} and the model's text encoders are {names}; "
                                 f"no part for {', '.join(missing)}, so pass an embedding trained on this model")
    return [inspect_file(f, (e.tokenizer, e.encoder), class_word, k, model_name, part=e.name, pieces=e.pieces)
            for e in encoders if e.name in f.parts]


def other_family(f: EmbeddingFile, family: str, model_name: str, names: str, verb: str) -> str:
    """The sentence of a per-encoder file of one family against a model of another (an SDXL file against FLUX.1)."""
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in f.parts.items())
    return (f"{f.path.name} is {an(f.family)} {f.family} embedding ({shapes}) but {model_name or 'the model'} is "
            f"{an(family)} {family} model ({names}); {verb} it against the {f.family} model it was trained on (e.g. "
            f"--model {f.family_model}), or pass {an(family)} {family} embedding")


def inspect_embedding(path: str | Path, pipe_or_parts: Any, class_word: str | None = None, k: int = 5,
                      model_name: str = "") -> InspectReport:
    """Read any embedding file (persviz.embedding_files) and diagnose it against a model's vocabulary.

    Args:
        path: the file (diffusers, Custom Diffusion, A1111, kohya; SDXL files are refused with the reason).
        pipe_or_parts: a pipeline or (tokenizer, text_encoder), e.g. load_text_model("shapesworld").
        class_word: one token of the vocabulary; adds |V*|/|c| and cos(V*, c) per row.
        k: nearest vocabulary words per row.
    Raises ValueError (EmbeddingFileError for the file) naming the problem and the fix.
    """
    return inspect_file(read_embedding_file(path), pipe_or_parts, class_word, k, model_name)


def inspect_folder(folder: str | Path, pipe_or_parts: Any, class_word: str | None = None, k: int = 5,
                   model_name: str = "") -> list[tuple[Path, InspectReport | EmbeddingFileError]]:
    """inspect_file for every embedding file of a folder (several embeddings, not one run): a report (a list of
    them, one per encoder, for a text stack of several encoders), or the sentence saying why that file cannot be
    read or does not fit the model. pipe_or_parts: as inspect_file's, or a text stack (load_text_stack)."""
    out: list[tuple[Path, Any]] = []
    for path, f in read_embedding_folder(folder):
        if not isinstance(f, EmbeddingFileError):
            try:
                if hasattr(pipe_or_parts, "encoders"):  # a text stack: one report per encoder of several
                    found = inspect_stack(f, pipe_or_parts, class_word, k, model_name)
                    f = found[0] if len(found) == 1 else found
                else:
                    f = inspect_file(f, pipe_or_parts, class_word, k, model_name)
            except EmbeddingFileError as err:
                f = err
        out.append((path, f))
    return out


def _per_encoder(found: list[tuple[Path, Any]]) -> list[tuple[Path, Any]]:
    """inspect_folder's result with each list of per-encoder reports spread over one entry per encoder."""
    return [(p, x) for p, r in found for x in (r if isinstance(r, list) else [r])]


def folder_text(folder: str | Path, found: list[tuple[Path, InspectReport | EmbeddingFileError]]) -> str:
    """One line per embedding of inspect_folder's result: format, token, rows, step and the diagnosis."""
    lines = [f"folder  {folder}: {len(found)} embedding file(s)"]
    for path, r in _per_encoder(found):
        if isinstance(r, EmbeddingFileError):
            lines.append(f"  {path.name}: not read: {r}")
            continue
        f = r.file
        if r.encoder:
            path = Path(f"{path.name} [{r.encoder}]")
        step = f", step {f['metadata']['step']}" if f["metadata"].get("step") is not None else ""
        worst = max((x.norm for x in r.rows if math.isfinite(x.norm)), default=math.nan)
        state = ("BROKEN (NaN/Inf rows)" if r.broken else
                 f"norm drift (max |V*| {worst:.3f} beyond p{TAIL} {r.vocab_norms[f'p{TAIL}']:.3f})" if r.collapsed
                 else f"no norm drift (max |V*| {worst:.3f})")
        lines.append(f"  {path.name}: {f['format']} ({f['tool']}), token {f['token']!r}, {f['rows']} x {f['width']}"
                     f"{step}: {state}")
    lines.append("inspect one file for its rows and nearest words: persviz inspect FOLDER/FILE")
    return "\n".join(lines)
