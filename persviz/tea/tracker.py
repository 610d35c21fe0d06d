"""Semantic shift over a Textual Inversion run (TEA Sec. 3.2.1-3.2.3, Figs. 2 and 4; docs/tea.md §3).

For every saved embedding V* of a run, encode three prompt sets with the pipeline's text encoder:
P_V* (the contextual prompts with the placeholder), P_simple (the simple prompts with the placeholder)
and, once for the whole run, P_c (the contextual prompts with the class word). Then per step:

- inter-set distances d(P_V*, P_c): L2, Hausdorff, Mahalanobis, KL (``persviz.tea.shift.shift_distances``);
- intra-set distances of P_V* and of P_c: L2, Hausdorff, Mahalanobis (``persviz.tea.shift.intra_distances``);
- d(P_V*, P_simple), the same four metrics (KL only when both sets hold as many prompts: it pairs row i
  with row i);
- |V*| / |c| and cos(V*, c) (``embeddings.norm_ratio_and_cosine``), and |V*|.

    track = track_semantic_shift(pipe, "outputs/ti/square", "shapesworld_contextual", "shapesworld_simple")
    save_json(track, "outputs/ti/square/shift.json")
    fig = persviz.tea.plots.shift_grid(*to_shift_grid(track))

Several text encoders (SDXL). A prompt is what the family's pipeline feeds its UNet (``Family.prompt_states``:
SDXL each encoder's penultimate hidden state); each step's embedding holds a row per encoder ({"clip_l", "clip_g"}),
hooked into its own encoder; the distance columns are computed on the concatenated state the UNet reads (unprefixed),
on each encoder's part (prefixed "clip_l_", "clip_g_") and on the pooled embedding the UNet reads besides (SDXL:
clip_g's projected pooled output, ``pooled_prompt_embeds``; prefixed "clip_g_pooled_", one vector per prompt whatever
the representation), and |V*|/|c|, cos(V*, c), |V*| per encoder only, each against its own encoder's class-word row
("clip_l_norm_ratio", ...). One encoder (SD 1.x): the columns as below.

Representation. A prompt is the text encoder's last hidden state, all 77 positions, flattened to
77 x D features (``representation="full"``, the paper and the public code's
``investigate_semantic_drift.py``). ``representation="last"`` keeps only the last position
(hidden[:, -1], the padding/EOS state that has attended to the whole prompt), the code's other option.

How the embedding gets in. The pipeline is not modified: a private copy of its tokenizer holds the
placeholder, prompts are tokenized there, and a forward hook on the text encoder's input embedding writes V*
(cast to the encoder's dtype) at the placeholder's positions (as ``trainers.textual_inversion`` does during
training). The text encoder is neither copied nor resized, no row of it is written, and the hook and the
encoder's train/eval mode are restored on exit, also after an exception. A pipeline that already has the
placeholder loaded (``pipe.load_textual_inversion``) works too: the hook overrides that row for the duration.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from persviz.families import is_pipeline
from persviz.families.base import Pipeline
from persviz.tea import shift as sm
from persviz.embedding_files import EmbeddingFileError, read_embedding_file
from persviz.embeddings import prompt_parts, single_token_id, class_word_id, norm_ratio_and_cosine
from persviz.io import PathLike, write_json
from persviz.prompts import PLACEHOLDER, load_prompt_set
from persviz.tea.pipeline import prompt_family
from persviz.text_stack import PlaceholderRows
from persviz.trainers.textual_inversion import CONFIG_FILE, list_snapshots, load_snapshot_embedding

RunLike = Union[PathLike, Sequence[tuple[int, Any]], Mapping[int, Any]]

REPRESENTATIONS = ("full", "last")
INTER_METRICS = ("l2", "hausdorff", "mahalanobis", "kl")
INTRA_METRICS = ("l2", "hausdorff", "mahalanobis")
DEFAULT_PLACEHOLDER = "<v*>"


# ----------------------------------------------------------------------------- inputs


def _prompt_set(prompts: Any, name: str) -> list[str]:
    """A prompt set (a list, or a shipped set's name for load_prompt_set) with exactly one '{}' in each prompt."""
    if isinstance(prompts, str):
        try:
            prompts = load_prompt_set(prompts)
        except KeyError as err:
            raise ValueError(f"{name}: {err.args[0]}") from None
    out = list(prompts)
    if len(out) < 2:
        raise ValueError(f"{name} needs at least 2 prompts (the set statistics need them); got {len(out)}")
    for p in out:
        if not isinstance(p, str):
            raise ValueError(f"{name} must hold strings; got {type(p).__name__} {p!r}")
        if p.count(PLACEHOLDER) != 1:
            raise ValueError(
                f"{name}: prompt {p!r} has {p.count(PLACEHOLDER)} '{PLACEHOLDER}' placeholders; each prompt needs "
                f"exactly one, where the class word or the learned token goes (e.g. 'a {PLACEHOLDER} on a beach')"
            )
    return out


def _run_config(folder: Path) -> dict:
    cfg = folder / CONFIG_FILE
    return json.loads(cfg.read_text()) if cfg.is_file() else {}


def _rows(x: Any, where: str) -> torch.Tensor:
    """An embedding (tensor [D] / [n, D] or a saved file) as float32 [n, D] on the CPU."""
    if isinstance(x, (str, os.PathLike)):
        x = load_snapshot_embedding(x)
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise ValueError(f"{where} must be a tensor [D] or [n, D] or a learned-embedding file; got {type(x).__name__}")
    t = torch.as_tensor(x).detach()
    if t.ndim not in (1, 2) or t.numel() == 0 or not t.is_floating_point():
        raise ValueError(f"{where} must be a floating tensor [D] or [n, D]; got {t.dtype} {tuple(t.shape)}")
    t = t.float().cpu().reshape(-1, t.shape[-1])
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where} contains NaN or inf (a diverged training step?)")
    return t


def _parts(x: Any, where: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """An embedding as {encoder name: float32 [n, D]}: for one encoder a tensor or a file of its rows; for several
    (SDXL) a {name: rows} mapping or a file of one part per encoder (clip_l + clip_g, or diffusers' SDXL pair)."""
    if len(names) == 1:
        return {names[0]: _rows(x, where)}
    if isinstance(x, (str, os.PathLike)):
        try:
            x = read_embedding_file(x).parts
        except EmbeddingFileError as err:
            raise ValueError(f"{where}: {err}") from None
    if not isinstance(x, Mapping) or sorted(x) != sorted(names):
        got = sorted(x) if isinstance(x, Mapping) else type(x).__name__
        raise ValueError(f"{where} must hold one part per text encoder of the model ({', '.join(names)}), as an "
                         f"SDXL embedding file or a {{name: rows}} dict; got {got}")
    return {n: _rows(x[n], f"{where} ({n})") for n in names}


def _steps_of(run: RunLike) -> tuple[list[tuple[int, Any]], dict]:
    """[(step, embedding or file)] and the run's config.json (empty for a list)."""
    if isinstance(run, (str, os.PathLike)):
        folder = Path(run).expanduser()
        snaps = list_snapshots(folder)  # FileNotFoundError for a missing folder
        if not snaps:
            raise ValueError(
                f"{folder} holds no learned_embeds-steps-<k>.safetensors snapshots; train with "
                f"persviz.trainers.train_textual_inversion (saves one every TextualInversionConfig.save_every steps) or pass a "
                f"list of (step, embedding) pairs"
            )
        return list(snaps), _run_config(folder)
    items = list(run.items()) if isinstance(run, Mapping) else list(run)
    if not items:
        raise ValueError("run is empty; pass a run folder or a non-empty list of (step, embedding) pairs")
    out = []
    for k, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"run[{k}] must be a (step, embedding) pair; got {type(item).__name__}")
        step, emb = item
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise ValueError(f"run[{k}]: the step must be an int; got {step!r}")
        out.append((int(step), emb))
    return out, {}


# ----------------------------------------------------------------------------- encoding


class _PromptEncoder:
    """Encodes prompt sets through the pipeline's text encoders as its family's pipeline reads them
    (``Family.prompt_states``: SD 1.x the last hidden state, SDXL each encoder's penultimate one), with V* written
    at the placeholder by a hook in each encoder (its own row there)."""

    def __init__(self, pipe: Pipeline, placeholder: str, class_word: str, n_vectors: int, representation: str,
                 batch_size: int) -> None:
        if not is_pipeline(pipe):
            tokenizer, encoder = prompt_parts(pipe)
            if tokenizer is None or encoder is None:
                raise ValueError("pipe needs a tokenizer and a text_encoder (a StableDiffusionPipeline, or that pair)")
        if not isinstance(placeholder, str) or not placeholder or any(c.isspace() for c in placeholder):
            raise ValueError(f"placeholder must be a non-empty string without spaces, e.g. '<v*>'; got {placeholder!r}")
        if placeholder == class_word:
            raise ValueError(f"class word {class_word!r} is the placeholder itself; pass the class word (e.g. 'dog')")
        self.family, self.stack = prompt_family(pipe)
        self.names = [e.name for e in self.stack]
        self.tokens = [placeholder] + [f"{placeholder}_{i}" for i in range(1, n_vectors)]
        self.toks, self.ids, self.class_ids, self.weights, self.class_row_list = [], [], [], [], []
        self.states = self.family.state_encoders(self.stack)  # the encoders whose states the denoiser reads
        for e in self.stack:
            weight = e.encoder.get_input_embeddings().weight
            if weight.device.type == "meta":
                raise ValueError("the text encoder's weights are on the meta device (sequential offload); load them first")
            if e.pieces:  # a SentencePiece encoder (Flux's T5): a class word may be several tokens; c is their mean
                pieces = e.tokenizer(class_word, add_special_tokens=False)["input_ids"]
                class_id, class_row = int(pieces[0]), weight[pieces].detach().float().mean(dim=0).cpu()
            else:
                class_id = class_word_id(e.tokenizer, class_word)
                class_row = weight[class_id].detach().float().cpu()
            tok = copy.deepcopy(e.tokenizer)  # the pipeline's tokenizers are never changed
            base = int(tok.vocab_size)
            for t in self.tokens:
                tid = single_token_id(tok, t)
                if tid is not None and tid < base:
                    raise ValueError(f"placeholder token {t!r} is a word of the vocabulary (id {tid}); the tracker "
                                     f"would overwrite it everywhere. Use the run's placeholder, such as '<v*>'")
                if tid is None:
                    tok.add_tokens([t])
            ids = tok.convert_tokens_to_ids(self.tokens)
            if class_id in ids:
                raise ValueError(f"class word {class_word!r} is one of the placeholder's tokens; pass the class word")
            self.toks.append(tok)
            self.ids.append(ids)
            self.class_ids.append(class_id)
            self.weights.append(weight)
            self.class_row_list.append(class_row)
        self.representation = representation
        self.batch_size = batch_size

    @property
    def widths(self) -> dict[str, int]:
        return {n: int(w.shape[1]) for n, w in zip(self.names, self.weights)}

    @property
    def class_rows(self) -> dict[str, torch.Tensor]:
        """Each encoder's class-word row, float32 on the CPU (a SentencePiece encoder's word of several tokens: the
        mean of their rows, as tea())."""
        return dict(zip(self.names, self.class_row_list))

    def _tokenized(self, k: int, prompts: list[str], with_rows: bool) -> tuple[Any, Any, Any]:
        """Encoder k's (ids with the placeholder's positions read as the class word, mask, sel) for the prompts."""
        tok = self.toks[k]
        batch = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt")
        ids = batch.input_ids
        if not with_rows:
            return batch, ids, (None, None)
        hits = ids[..., None] == torch.tensor(self.ids[k])  # [N, L, n]
        counts = hits.sum(1)  # [N, n]: how often each placeholder token occurs in each prompt
        if bool((counts != 1).any()):
            bad = int((counts != 1).any(1).nonzero()[0])
            raise ValueError(f"prompt {prompts[bad]!r} does not hold the placeholder tokens {self.tokens} exactly "
                             f"once each after tokenization (cut at {tok.model_max_length} tokens?)")
        mask, sel = hits.any(-1), hits.int().argmax(-1)
        return batch, torch.where(mask, self.class_ids[k], ids), (mask, sel)  # any valid row: the hook writes V*

    @torch.no_grad()
    def encode(self, prompts: list[str], rows: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """{encoder name: [N, F_e]}, under "" the concatenated state the UNet reads [N, F] (one encoder: the same
        tensor) and, where the family feeds the UNet a pooled embedding (SDXL), under ``pooled_name`` that [N, P],
        float32; rows {encoder name: [n, D_e]} is V* (None: no placeholder in the prompts)."""
        tokenized = [self._tokenized(k, prompts, rows is not None) for k in range(len(self.stack))]
        hooks = [PlaceholderRows(rows[n].to(e.encoder.device) if rows is not None else torch.empty(0))
                 for n, e in zip(self.names, self.stack)]
        out: dict[str, list[torch.Tensor]] = {n: [] for n in [*self.names, ""]}
        pooled_out: list[torch.Tensor] = []
        with contextlib.ExitStack() as hooked:
            for h, e in zip(hooks, self.stack):
                hooked.enter_context(h.hooked(e.encoder))
            for s in range(0, len(prompts), self.batch_size):
                b = slice(s, s + self.batch_size)
                tokens = []
                for h, e, (batch, ids, (mask, sel)) in zip(hooks, self.stack, tokenized):
                    if mask is not None:
                        h.mask, h.sel = mask[b].to(e.encoder.device), sel[b].to(e.encoder.device)
                    # real_ids: the pooled embedding is read where the pipeline reads it with the token loaded
                    tokens.append({"input_ids": ids[b], "attention_mask": batch.attention_mask[b],
                                   "real_ids": batch.input_ids[b]})
                states, pooled = self.family.prompt_states(self.stack, tokens)
                if pooled is not None:
                    pooled_out.append(pooled.reshape(pooled.shape[0], -1).float())
                if self.representation == "last":
                    states = [x[:, -1] for x in states]
                flat = [x.reshape(x.shape[0], -1).float() for x in states]
                for n, x in zip(self.names, flat):
                    out[n].append(x)
                last = [x.float() for x, n in zip(states, self.names) if n in self.states]
                whole = torch.cat(last, dim=-1)
                out[""].append(whole.reshape(whole.shape[0], -1))
        if pooled_out:
            out[self.pooled_name] = pooled_out
        return {n: torch.cat(v) for n, v in out.items()}

    @property
    def pooled_name(self) -> str | None:
        """The pooled embedding's column prefix: the pooling encoder's name + '_pooled' (SDXL: clip_g_pooled, FLUX.1:
        clip_l_pooled); None where the family has no pooled embedding."""
        name = self.family.pooled_encoder(self.stack)
        return None if name is None else f"{name}_pooled"


class _EvalMode:
    """Eval mode for a module tree inside the block; each submodule's mode restored on exit."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.modes = [(m, m.training) for m in module.modules()]
        self.module = module

    def __enter__(self) -> None:
        self.module.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, t in self.modes:
            m.training = t


# ----------------------------------------------------------------------------- tracking


def _check_choice(value: Any, name: str, choices: Iterable[str]) -> None:
    if value not in tuple(choices):
        raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}")


def track_semantic_shift(
    pipe: Pipeline,
    run: RunLike,
    prompts: Sequence[str] | str,
    simple_prompts: Sequence[str] | str | None = None,
    *,
    class_word: str | None = None,
    placeholder: str | None = None,
    covariance: sm.Covariance = "pinv",
    intra_covariance: sm.Covariance = "ledoit_wolf",
    tau: float = 1.0,
    representation: str = "full",
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, list]:
    """Semantic-shift metrics and |V*|/|c|, cos(V*, c) at every saved step of a Textual Inversion run.

    Args:
        pipe: a StableDiffusionPipeline (or a (tokenizer, text_encoder) pair); left exactly as it was.
        run: a run folder of ``train_textual_inversion`` (its ``learned_embeds-steps-<k>.safetensors``, in step
            order; its config.json supplies placeholder and class word), or (step, embedding) pairs / a
            {step: embedding} dict, an embedding being a tensor [D] or [n, D] or a learned-embedding file.
        prompts: the contextual prompt set, one "{}" per prompt (a list, or a shipped set's name such as
            "shapesworld_contextual"). P_V* fills in the placeholder, P_c the class word.
        simple_prompts: the simple set ("a photo of a {}"), filled with the placeholder for d(P_V*, P_simple);
            None skips those columns.
        class_word: one-token word c ("square", "dog"); default: the run's initializer (config.json).
        placeholder: the token string put into the prompts; default: the run's placeholder, else "<v*>".
            An n-vector embedding uses tokens placeholder, placeholder_1, ... (diffusers' convention).
        covariance: Cov estimate of the inter-set and vs-simple Mahalanobis ("pinv", the public code's, or
            "ledoit_wolf"). intra_covariance: of the intra-set Mahalanobis (default "ledoit_wolf": with "pinv" it
            is the constant (N-1)/sqrt(N)).
        tau: KL softmax temperature.
        representation: "full" (last hidden state, 77 x D flattened; the paper) or "last" (hidden[:, -1]).
        batch_size: prompts per text-encoder call.
        progress: show a tqdm progress bar over the steps.

    Returns a dict of equally long lists, one entry per step (``pandas.DataFrame(track)`` reads it):
    "step"; "inter_<m>" for m in l2, hausdorff, mahalanobis, kl (d(P_V*, P_c)); "intra_vstar_<m>" and
    "intra_class_<m>" for m in l2, hausdorff, mahalanobis ("intra_class_*" is the same at every step);
    "vs_simple_<m>" for the four metrics (with simple_prompts; "vs_simple_kl" is None when the two sets differ
    in size); "norm_ratio" (|V*|/|c|), "cosine" (cos(V*, c)) and "vstar_norm" (|V*|), each the mean over
    the vectors of a multi-vector embedding. A pipeline of several text encoders (SDXL): the distance columns on
    the concatenated state the UNet reads, the same prefixed with each encoder's name ("clip_l_inter_l2") on its
    own part, the same prefixed "<encoder>_pooled_" on the pooled embedding the denoiser reads besides
    (``Family.pooled_encoder``: SDXL's "clip_g_pooled_", clip_g's projected pooled output; FLUX.1's "clip_l_pooled_",
    CLIP's pooled output; one vector per prompt), and "<name>_norm_ratio", "<name>_cosine", "<name>_vstar_norm" per
    encoder instead of the unprefixed ones; run snapshots and (step, embedding) pairs hold one part per encoder (a
    file or a {name: rows} dict). FLUX.1: the unprefixed columns on T5's last hidden state (the transformer's
    prompt_embeds), "t5_..." the same, "clip_l_..." on CLIP's last hidden state.
    """
    _check_choice(representation, "representation", REPRESENTATIONS)
    _check_choice(covariance, "covariance", ("pinv", "ledoit_wolf"))
    _check_choice(intra_covariance, "intra_covariance", ("pinv", "ledoit_wolf"))
    sm.check_tau(tau)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    contextual = _prompt_set(prompts, "prompts")
    simple = None if simple_prompts is None else _prompt_set(simple_prompts, "simple_prompts")
    steps, cfg = _steps_of(run)
    if class_word is None:
        class_word = cfg.get("initializer")
        if class_word is None:
            raise ValueError("pass class_word= (the one-token word the placeholder stands for, e.g. 'dog'); it is "
                             "read from a run folder's config.json only")
    placeholder = placeholder or cfg.get("placeholder") or DEFAULT_PLACEHOLDER

    names = [e.name for e in prompt_family(pipe)[1]]
    first = _parts(steps[0][1], f"the embedding of step {steps[0][0]}", names)
    n_vectors = {int(r.shape[0]) for r in first.values()}
    if len(n_vectors) != 1:
        raise ValueError(f"the embedding of step {steps[0][0]} has a different number of vectors per encoder "
                         f"({ {n: int(r.shape[0]) for n, r in first.items()} })")
    enc = _PromptEncoder(pipe, placeholder, class_word, n_vectors.pop(), representation, int(batch_size))
    for n, D in enc.widths.items():
        if first[n].shape[1] != D:
            where = f"the {n} text encoder's" if len(names) > 1 else "the text encoder's"
            raise ValueError(f"the embeddings have size D={first[n].shape[1]} but {where} rows have D={D}; "
                             f"the run was trained on another model")
    with_ph = [p.replace(PLACEHOLDER, " ".join(enc.tokens)) for p in contextual]
    with_class = [p.replace(PLACEHOLDER, class_word) for p in contextual]
    simple_ph = None if simple is None else [p.replace(PLACEHOLDER, " ".join(enc.tokens)) for p in simple]
    c = enc.class_rows
    several = len(names) > 1
    states = [""] + (names if several else [])  # "": the state the UNet reads (several encoders: concatenated)

    def col(state: str, name: str) -> str:
        return f"{state}_{name}" if state else name

    metric_names = ([f"inter_{m}" for m in INTER_METRICS] + [f"intra_vstar_{m}" for m in INTRA_METRICS]
                    + [f"intra_class_{m}" for m in INTRA_METRICS]
                    + ([f"vs_simple_{m}" for m in INTER_METRICS] if simple is not None else []))
    row_names = ["norm_ratio", "cosine", "vstar_norm"]
    cols: dict[str, list] = {"step": []}
    for st in states:
        cols.update({col(st, k): [] for k in metric_names})
    for n in (names if several else [""]):
        cols.update({col(n, k): [] for k in row_names})

    with contextlib.ExitStack() as modes:
        for e in enc.stack:
            modes.enter_context(_EvalMode(e.encoder))
        P_c = enc.encode(with_class, None)  # once for the whole run
        if enc.pooled_name in P_c:  # the pooled embedding the UNet reads besides (SDXL's clip_g)
            states.append(enc.pooled_name)
            cols.update({col(enc.pooled_name, k): [] for k in metric_names})
        intra_c = {st: sm.intra_distances(P_c[st], intra_covariance) for st in states}
        for i, (step, item) in enumerate(tqdm(steps, desc=f"semantic shift {placeholder}", disable=not progress)):
            rows = first if i == 0 else _parts(item, f"the embedding of step {step}", names)
            for n in names:
                if rows[n].shape != first[n].shape:
                    raise ValueError(f"step {step}: embedding shape {tuple(rows[n].shape)} differs from the first "
                                     f"step's {tuple(first[n].shape)}")
            P_v = enc.encode(with_ph, rows)
            P_s = None if simple_ph is None else enc.encode(simple_ph, rows)
            cols["step"].append(step)
            for st in states:
                for m, v in sm.shift_distances(P_v[st], P_c[st], covariance, tau).items():
                    cols[col(st, f"inter_{m}")].append(v)
                for m, v in sm.intra_distances(P_v[st], intra_covariance).items():
                    cols[col(st, f"intra_vstar_{m}")].append(v)
                for m, v in intra_c[st].items():
                    cols[col(st, f"intra_class_{m}")].append(v)
                if P_s is not None:
                    pv, ps = P_v[st], P_s[st]
                    cols[col(st, "vs_simple_l2")].append(sm.l2_distance(pv, ps))
                    cols[col(st, "vs_simple_hausdorff")].append(sm.hausdorff_distance(pv, ps))
                    cols[col(st, "vs_simple_mahalanobis")].append(sm.mahalanobis_distance(pv, ps, covariance))
                    cols[col(st, "vs_simple_kl")].append(sm.kl_divergence(pv, ps, tau) if len(pv) == len(ps) else None)
            for n in names:  # each encoder's row against its own encoder's class-word row
                ratio, cos = norm_ratio_and_cosine(rows[n], c[n])
                key = n if several else ""
                cols[col(key, "norm_ratio")].append(float(ratio.mean()))
                cols[col(key, "cosine")].append(float(cos.mean()))
                cols[col(key, "vstar_norm")].append(float(rows[n].double().norm(dim=-1).mean()))
    return cols


# ----------------------------------------------------------------------------- output


def spread_by_position(pipe: Pipeline, vector: Any, prompts: Sequence[str] | str, placeholder: str,
                       class_word: str) -> dict[str, float]:
    """Where the intra-set spread of P_V* sits (docs/findings.md, finding ii): the mean squared L2 distance of the
    prompts' last hidden states to their mean (the full 77 x D state, as the tracker), split over token positions
    by where each lies in its prompt: before V*, at V*, after V* (a causal encoder's tokens after V* read it), and
    the padding past the prompt's end. The parts add up to 'total' (half the mean pairwise squared distance)."""
    prompts = _prompt_set(prompts, "prompts")
    rows = _rows(vector, "vector")
    enc = _PromptEncoder(pipe, placeholder, class_word, rows.shape[0], "full", 64)
    if len(enc.names) != 1:
        raise ValueError(f"spread_by_position takes a pipeline with one text encoder; this one has {enc.names}")
    texts = [p.replace(PLACEHOLDER, " ".join(enc.tokens)) for p in prompts]
    with contextlib.ExitStack() as modes:
        for e in enc.stack:
            modes.enter_context(_EvalMode(e.encoder))
        h = enc.encode(texts, {enc.names[0]: rows})[""].double().cpu()
    tok = enc.toks[0]
    n, length = h.shape[0], tok.model_max_length
    h = h.reshape(n, length, -1)
    dev = ((h - h.mean(0, keepdim=True)) ** 2).sum(-1)  # [N, L]: each prompt's squared deviation per position
    ids = tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    at = torch.isin(ids, torch.tensor(enc.ids[0]))
    first = at.int().argmax(1, keepdim=True)
    pos = torch.arange(length)[None]
    ends = (ids == tok.eos_token_id).int().argmax(1, keepdim=True)
    parts = {"before": pos < first, "at": at, "after": (pos > first) & ~at & (pos <= ends), "padding": pos > ends}
    out = {k: float((dev * m).sum() / n) for k, m in parts.items()}
    out["total"] = float(dev.sum() / n)
    return out


def to_shift_grid(track: Mapping[str, list]) -> tuple[list, dict[str, dict[str, list]]]:
    """(steps, {metric: {curve: values}}) for ``persviz.tea.plots.shift_grid``; curves with missing values are left out."""
    labels = {"inter": "inter d(P_V*, P_c)", "intra_vstar": "intra d(P_V*)", "intra_class": "intra d(P_c)",
              "vs_simple": "d(P_V*, P_simple)"}
    titles = {"l2": "L2", "hausdorff": "Hausdorff", "mahalanobis": "Mahalanobis", "kl": "KL"}
    out: dict[str, dict[str, list]] = {}
    for m, title in titles.items():
        curves = {lab: list(track[f"{k}_{m}"]) for k, lab in labels.items()
                  if f"{k}_{m}" in track and all(v is not None for v in track[f"{k}_{m}"])}
        if curves:
            out[title] = curves
    return list(track["step"]), out


def save_json(obj: Mapping[str, Any], path: PathLike) -> Path:
    """Write a track (or any JSON-able dict; numpy/torch numbers converted) atomically; returns the path.

    The file appears whole or not at all (persviz.io.write_json); NaN and infinities are written as null, as
    every persviz JSON file (persviz.io.to_jsonable).
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"save_json writes a dict; got {type(obj).__name__}")
    return write_json(Path(path).expanduser(), obj)


def load_json(path: PathLike) -> dict:
    """Read a file written by save_json (older files holding NaN literals read too)."""
    return json.loads(Path(path).expanduser().read_text(encoding="utf-8"))


__all__ = ["track_semantic_shift", "to_shift_grid", "save_json", "load_json", "REPRESENTATIONS"]
