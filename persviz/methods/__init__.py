"""The registry of personalization methods: one module per method behind one protocol (``persviz.methods.base``).

    from persviz.methods import get_method
    m = get_method("ti")                      # aliases and command-line names are accepted
    config = m.recipe("<my-dog>", "dog", shapesworld=False, steps=500)
    m.train(pipe, images, config, "my_dog/textual_inversion")
    with m.loaded(pipe, "my_dog/textual_inversion"):
        image = pipe(m.slot_word("<my-dog>", "dog") ...)

Adding a method: one module here defining a ``Method`` subclass and its ``METHOD`` object, one line in
``_MODULES``, and its tests (docs/contributing.md). Nothing outside this package compares a method's name.
"""
from __future__ import annotations

from importlib import import_module

from persviz.errors import PersvizError
from persviz.methods.base import Method

_MODULES = ("textual_inversion", "dreambooth", "custom_diffusion", "lora_finetune")  # one line per method
REGISTRY: dict[str, Method] = {m.name: m for m in (import_module(f"persviz.methods.{n}").METHOD for n in _MODULES)}
METHODS: tuple[str, ...] = tuple(n for n, m in REGISTRY.items() if m.concept_method)  # the TEA paper's three
CLI_NAMES: tuple[str, ...] = tuple(a for n in METHODS for a in (REGISTRY[n].cli_name, *REGISTRY[n].aliases))


class UnknownMethodError(PersvizError, ValueError):
    """A method name that is not in the registry; the message lists the known ones."""


def get_method(name: str, concept_only: bool = True) -> Method:
    """The method called `name` (its name, command-line name or an alias: 'textual_inversion', 'textual-inversion',
    'ti'); concept_only: only the methods that personalize a concept (METHODS)."""
    key = str(name).strip().lower()
    for m in REGISTRY.values():
        if key in (m.name, m.cli_name, *m.aliases) and (m.concept_method or not concept_only):
            return m
    known = METHODS if concept_only else tuple(REGISTRY)
    raise UnknownMethodError(f"unknown method {name!r}; choose one of {', '.join(known)}")


def concept_methods(names: object = None) -> list[Method]:
    """The concept methods named in `names` (any iterable of names, e.g. a concept's runs), in registry order."""
    wanted = set(METHODS) if names is None else {get_method(n).name for n in names}  # type: ignore[union-attr]
    return [REGISTRY[n] for n in METHODS if n in wanted]


def tracked_method(names: object) -> Method | None:
    """Among `names` (e.g. a concept's runs), the method whose snapshots are the learned row over steps, if any."""
    return next((m for m in concept_methods(names) if m.row_snapshots), None)


__all__ = ["CLI_NAMES", "METHODS", "REGISTRY", "Method", "UnknownMethodError", "concept_methods", "get_method",
           "tracked_method"]
