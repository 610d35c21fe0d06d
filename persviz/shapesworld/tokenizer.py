"""Build a CLIP-format BPE tokenizer (vocab.json + merges.txt) that covers ShapesWorld's words.

Every world word becomes one token; any other text still tokenizes through the 256 byte
symbols, exactly as with the real CLIP tokenizer, so `add_tokens("<v*>")` works as in SD 1.5."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from persviz.shapesworld.captions import world_words

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
EXTRA_WORDS = ("photo", "with", "and", "sks", "style", "art", "painting", "drawing", "toy", "shape", "object")


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b); cs.append(256 + n); n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training until every word is a single symbol (ties broken alphabetically)."""
    segs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in segs.values()):
        pairs = Counter(p for s in segs.values() for p in zip(s, s[1:]))
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, s in segs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1]); i += 2
                else:
                    out.append(s[i]); i += 1
            segs[w] = tuple(out)
    return merges


def build_tokenizer_files(folder: str | Path, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and the tokenizer config that CLIPTokenizer loads."""
    folder = Path(folder); folder.mkdir(parents=True, exist_ok=True)
    words = sorted(set(world_words()) | set(EXTRA_WORDS))
    merges = learn_merges(words)
    symbols = _bytes_to_unicode()
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": model_max_length, "bos_token": BOS,
              "eos_token": EOS, "unk_token": EOS, "pad_token": EOS, "do_lower_case": True,
              "errors": "replace", "clean_up_tokenization_spaces": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2))
    return folder
