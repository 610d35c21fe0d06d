"""Token checks and the settings the methods share (light: no torch at import; the floor and the methods use them)."""
from __future__ import annotations

from typing import Any

DREAMBOOTH_IDENTIFIER = "sks"
SHAPESWORLD_SAMPLING = {"class_steps": 25, "class_guidance": 4.0}  # the micro-SD's documented sampling settings


def single_token_id(tokenizer: Any, word: str) -> int | None:
    """The id of `word` if it tokenizes to exactly one token (vocabulary or added token), else None."""
    if not isinstance(word, str) or not word.strip():
        return None
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


def check_new_token_and_class_word(tokenizer: Any, token: str, class_word: str) -> None:
    """The class word is one token (it initialises the learned row) and the token is new; a ValueError saying why."""
    if single_token_id(tokenizer, class_word) is None:
        pieces = tokenizer.tokenize(class_word)
        raise ValueError(f"the class word {class_word!r} is {len(pieces)} tokens for this tokenizer ({pieces}); "
                         "pick a class word that is one token, such as 'dog', 'toy' or 'square'")
    existing = single_token_id(tokenizer, token)
    if existing is not None:
        raise ValueError(f"the placeholder {token!r} is already a token of the tokenizer (id {existing}); pick a "
                         "new string such as '<my-concept>'")


def check_identifier(token: str) -> None:
    """DreamBooth's identifier (e.g. 'sks') is an existing rare token by design and only has to be one word."""
    if not token.strip() or len(token.split()) != 1:
        raise ValueError(f"DreamBooth's identifier must be one word, such as {DREAMBOOTH_IDENTIFIER!r}; got {token!r}")


__all__ = ["DREAMBOOTH_IDENTIFIER", "SHAPESWORLD_SAMPLING", "check_identifier", "check_new_token_and_class_word",
           "single_token_id"]
