"""The house: three rooms (tea, finexl, pigeon) over one floor, one door (cli, __main__, the subcommands of
persviz.commands, run_notebooks) on top.

Walks every module's imports with ast (top level and inside functions) and fails listing every offender:
the floor importing a room or the door, a room importing another room or the door, anything below importing the
door, a ``_private`` name used across modules (imported, or read as an attribute of an imported module), and an
import cycle among persviz's modules (a imports b imports ... imports a, at the top or inside a function).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "persviz"
ROOMS = ("persviz.tea", "persviz.finexl", "persviz.pigeon")
DOOR = ("persviz.cli", "persviz.__main__", "persviz.commands", "persviz.run_notebooks")  # a package: its modules too


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def place(module: str) -> str:
    """'door', a room's name, or 'floor'."""
    if any(module == d or module.startswith(d + ".") for d in DOOR):
        return "door"
    for room in ROOMS:
        if module == room or module.startswith(room + "."):
            return room
    return "floor"


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every persviz import in a file, relative ones resolved."""
    mod = module_name(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            name = node.module or ""
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([name] if name else []))
            if name == "persviz" or name.startswith("persviz."):
                out.append((node.lineno, name, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("persviz")]
    return out


def private_uses(path: Path) -> list[str]:
    """Private names of persviz modules this file uses without defining them: imported, or module._name."""
    tree = ast.parse(path.read_text(), str(path))
    own = module_name(path) if path.is_relative_to(PACKAGE) else None
    found, aliases = [], {}
    for line, name, names in imports(path):
        for n in names:
            if n.startswith("_") and not n.startswith("__"):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {name}.{n}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("persviz"):
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("persviz"):
                    aliases[a.asname or a.name] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in aliases
                and aliases[node.value.id] != own):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return found


def offenders() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = place(module_name(path))
        for line, name, _ in imports(path):
            there = place(name)
            where = f"{path.relative_to(ROOT)}:{line} ({here}) imports {name} ({there})"
            if there == "door" and here != "door":
                bad.append(where + ": nothing below the door imports it")
            elif here == "floor" and there in ROOMS:
                bad.append(where + ": the floor imports no room")
            elif here in ROOMS and there in ROOMS and there != here:
                bad.append(where + ": rooms do not import each other")
    return bad


def test_the_house_has_no_back_arrows():
    bad = offenders()
    assert not bad, "imports against the house rules:\n" + "\n".join(bad)


def test_no_private_name_is_used_across_modules():
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "tests").rglob("*.py")) + sorted(
        (ROOT / "benchmarks").glob("*.py"))
    bad = [u for f in files for u in private_uses(f)]
    private_modules = sorted({name for f in files for _, name, _ in imports(f)
                              if any(p.startswith("_") and not p.startswith("__") for p in name.split("."))})
    bad += [f"module {m} is private but imported" for m in private_modules]
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_the_checker_catches_each_kind_of_offence(tmp_path, monkeypatch):
    """The walk itself: a planted floor->room, room->room, room->door import and a private import are all found."""
    pkg = tmp_path / "persviz"
    for sub in ("tea", "finexl"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "io.py").write_text("from persviz.tea import x\n")
    (pkg / "tea" / "a.py").write_text("from persviz.finexl import y\nfrom ..cli import main\n")
    (pkg / "finexl" / "b.py").write_text("from persviz.io import _hidden\n")
    (pkg / "cli.py").write_text("from persviz.tea import a\n")
    (pkg / "commands").mkdir()
    (pkg / "commands" / "tea.py").write_text("def run():\n    from persviz.tea import a\n")
    (pkg / "loading.py").write_text("from persviz.commands.tea import run\n")
    globals()["ROOT"], globals()["PACKAGE"] = tmp_path, pkg
    try:
        bad = offenders()
        priv = private_uses(pkg / "finexl" / "b.py")
    finally:
        globals()["ROOT"], globals()["PACKAGE"] = Path(__file__).resolve().parents[2], Path(
            __file__).resolve().parents[2] / "persviz"
    assert any("io.py" in b and "floor imports no room" in b for b in bad)
    assert any("tea/a.py" in b and "rooms do not import each other" in b for b in bad)
    assert any("tea/a.py" in b and "persviz.cli" in b for b in bad)
    assert not any("cli.py" in b or "commands/tea.py" in b for b in bad)
    assert any("loading.py" in b and "nothing below the door imports it" in b for b in bad)
    assert priv and "_hidden" in priv[0]


def import_graph() -> dict[str, set[str]]:
    """{module: the persviz modules it imports}, top level and inside functions; `from pkg import sub` is pkg.sub."""
    paths = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph = {}
    for mod, path in paths.items():
        found = set()
        for _, name, names in imports(path):
            found |= {f"{name}.{n}" if f"{name}.{n}" in paths else name for n in names} if names else {name}
        graph[mod] = {m for m in found if m in paths and m != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: each group of modules that reach one another (Tarjan's strongly connected components of
    more than one module), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_import_cycles():
    """No persviz module reaches itself through imports (the constant or function both need goes to its owner)."""
    found = cycles(import_graph())
    assert not found, "import cycles among persviz's modules:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_cycle_check_finds_planted_cycles(tmp_path):
    """Three modules in a ring (one link inside a function), a submodule imported as `from persviz import f`, a
    relative import; modules that only lead into a cycle are not part of it."""
    pkg = tmp_path / "persviz"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from persviz.b import x\n")
    (pkg / "b.py").write_text("def f():\n    from persviz import c  # cycle\n")
    (pkg / "c.py").write_text("import persviz.a\n")
    (pkg / "d.py").write_text("from persviz.a import y\nfrom persviz import constants_not_a_module\n")
    (pkg / "sub" / "e.py").write_text("from . import f\n")
    (pkg / "sub" / "f.py").write_text("from persviz.sub.e import z\n")
    (pkg / "g.py").write_text("from persviz import d\n")
    globals()["ROOT"], globals()["PACKAGE"] = tmp_path, pkg
    try:
        graph = import_graph()
    finally:
        globals()["ROOT"], globals()["PACKAGE"] = Path(__file__).resolve().parents[2], Path(
            __file__).resolve().parents[2] / "persviz"
    assert graph["persviz.b"] == {"persviz.c"} and graph["persviz.d"] == {"persviz.a", "persviz"}
    assert cycles(graph) == [["persviz.a", "persviz.b", "persviz.c"], ["persviz.sub.e", "persviz.sub.f"]]
    assert cycles({"x": {"y"}, "y": set()}) == []


# ----------------------------------------------------------------------------- methods and families as objects

REGISTRIES = ("methods", "families")  # persviz/methods/, persviz/families/: the only places a name may be compared


def _string_literals(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
    return []


def name_comparisons(source: str, names: set[str], where: str = "<source>") -> list[str]:
    """'where:line: names' of every comparison (==, !=, in, not in, is) with a string literal (or a literal tuple,
    list or set of them) that is one of `names`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            hits = [v for opnd in (node.left, *node.comparators) for v in _string_literals(opnd) if v in names]
            if hits:
                found.append(f"{where}:{node.lineno}: {hits}")
    return found


def test_name_comparisons_are_found_by_the_check():
    names = {"dreambooth", "sd1"}
    src = ('if m == "dreambooth": pass\nif m in ("x", "sd1"): pass\nif "dreambooth" not in runs: pass\n'
           'if m.name == other: pass\nx = {"dreambooth": 1}\n')
    assert name_comparisons(src, names) == ["<source>:1: ['dreambooth']", "<source>:2: ['sd1']",
                                            "<source>:3: ['dreambooth']"]


def test_no_method_or_family_name_is_compared_outside_the_registries():
    """The code asks the method or family object (persviz.methods, persviz.families) instead of comparing its name;
    the names stay as JSON keys, folder names and command-line choices."""
    from persviz.families import FAMILIES
    from persviz.methods import REGISTRY
    names = set(REGISTRY) | set(FAMILIES)
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] in REGISTRIES:
            continue
        found += name_comparisons(path.read_text(), names, str(path.relative_to(ROOT)))
    assert not found, "compare the object's properties, not its name:\n" + "\n".join(found)
