"""Textual Inversion as a persviz method: one new token row learned (diffusers' learned_embeds snapshots)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persviz.errors import ConceptFolderError
from persviz.families import text_stack
from persviz.families.base import Pipeline
from persviz.methods.adoption import ForeignRun, asked_token, not_found, persviz_config
from persviz.methods.base import Method
from persviz.tokens import check_new_token_and_class_word

# The source recorded for an adopted run, by the embedding format of its final file (else "diffusers").
SOURCES = {"a1111": "a1111", "a1111-image": "a1111", "kohya": "kohya", "textual-inversion": "textual-inversion"}


@dataclass(frozen=True)
class TextualInversion(Method):
    """Textual Inversion (Gal et al.): token-level TEA on the learned row; its snapshots are the row over steps."""

    def config(self, token: str, class_word: str, settings: dict[str, Any]) -> Any:
        from persviz.trainers.textual_inversion import TextualInversionConfig  # heavy: the trainers
        return TextualInversionConfig(placeholder=token, initializer=class_word, **settings)

    def train(self, pipe: Pipeline, images: Any, config: Any, out: Path, progress: bool = True,
              load_result: bool = False) -> Any:
        from persviz.trainers.textual_inversion import train_textual_inversion  # heavy: the trainers
        return train_textual_inversion(pipe, images, config, out, progress=progress, load_result=load_result)

    @contextlib.contextmanager
    def loaded(self, pipe: Pipeline, run: Path) -> Iterator[None]:
        from persviz.trainers.textual_inversion import load_textual_inversion_run  # heavy: the trainers
        stack = text_stack(pipe)
        # diffusers' unload leaves config.vocab_size grown; a later LoRA save would then hold the embedding matrix
        vocab = [e.encoder.config.vocab_size for e in stack]
        before = [set(e.tokenizer.get_added_vocab()) for e in stack]
        tokens = load_textual_inversion_run(pipe, Path(run))  # any format, by content; SDXL: a row per encoder
        try:
            yield
        finally:
            for e, v, old in zip(stack, vocab, before):
                if set(e.tokenizer.get_added_vocab()) - old:
                    pipe.unload_textual_inversion(tokens, tokenizer=e.tokenizer, text_encoder=e.encoder)
                e.encoder.config.vocab_size = v

    def snapshots(self, run: Path) -> list[tuple[int, Path]]:
        from persviz.trainers.textual_inversion import list_snapshots  # heavy: the trainers
        return list_snapshots(run)

    def check_tokens(self, tokenizer: Any, token: str, class_word: str) -> None:
        check_new_token_and_class_word(tokenizer, token, class_word)

    def detect_run(self, path: Path, token: str | None = None) -> ForeignRun:
        """A run folder of numbered snapshots (diffusers, A1111, kohya, the original Textual Inversion, persviz);
        the token is the one the files store (--token only confirms it)."""
        from persviz.embedding_files import check_fits, read_embedding_file  # heavy: torch
        from persviz.trainers.textual_inversion import final_embedding, list_snapshots, run_token  # heavy: trainers
        if not path.is_dir():
            raise not_found(self, path, "pass the run's folder (the tracker reads its snapshots)")
        try:
            snaps = list_snapshots(path)
        except ValueError as err:
            raise not_found(self, path, str(err)) from None
        if not snaps:
            raise self._no_snapshots(path)
        files = [snaps[0][1], snaps[-1][1], final_embedding(path)]
        read = [read_embedding_file(f) for f in files]  # EmbeddingFileError (a ValueError) names the file and the fix
        if any(f.per_encoder for f in read):
            check_fits(next(f for f in read if f.per_encoder), 768)  # raises: SDXL
        names = {run_token(f) for f in read}
        if len(names) > 1:
            raise ConceptFolderError(f"{path} holds embeddings of several tokens ({', '.join(sorted(names))}); pass "
                                     "the folder of one run")
        cfg = persviz_config(path)
        fmt = read[-1].format
        source = "persviz" if cfg.get("placeholder") else SOURCES.get(fmt, "diffusers")
        return ForeignRun(self.name, path, source, asked_token(token, run_token(read[-1]), files[-1], fmt),
                          cfg.get("initializer"), tuple(dict.fromkeys(files)))

    def _no_snapshots(self, path: Path) -> ConceptFolderError:
        """What a folder without one run's numbered snapshots holds instead, in one sentence."""
        from persviz.embedding_files import embedding_candidates  # heavy: torch
        try:
            found = embedding_candidates(path)
        except OSError:
            found = []
        if not found:
            return not_found(self, path, "no snapshots")
        names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
        return not_found(self, path, f"it holds {len(found)} embedding file(s) ({names}) but no numbered snapshots of "
                         "one training run (an embeddings folder, not a run; `persviz inspect` the folder to see each)")

    def check_run_files(self, found: ForeignRun, pipe: Pipeline, text: Any) -> None:
        """Every embedding read against the text encoder's width (``embedding_files.check_fits``)."""
        from persviz.embedding_files import check_fits, read_embedding_file  # heavy: torch
        for f in found.files:
            check_fits(read_embedding_file(f), text.encoder)


METHOD = TextualInversion(
    "textual_inversion", "textual-inversion", aliases=("ti",), learns_token=True, tea_level="token",
    row_snapshots=True, needs_class_word=False,
    looked_for="learned_embeds-steps-<k>.safetensors / .bin snapshots (persviz, diffusers' textual_inversion.py), "
               "kohya's <name>-step<k:08d>.safetensors, the original Textual Inversion's "
               "checkpoints/embeddings_gs-<k>.pt or Automatic1111's embeddings/<name>-<k>.pt or "
               "image_embeddings/<name>-<k>.png")
