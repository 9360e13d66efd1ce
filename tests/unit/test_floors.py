"""The package stands in floors: every import (including those inside functions) points down, there are no cycles,
no module reads another module's private names, and no file grows past its size limit. DESIGN.md, "Layout"."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "lmforge"

# ground first; a module may import its own floor (without cycles) and any floor below
FLOORS: list[tuple[str, ...]] = [
    ("config", "errors", "atomic", "version", "tokenizer", "sandbox", "progress", "precision", "splits"),
    ("models",),
    ("transforms", "plan"),
    ("data", "curate"),
    ("objectives", "inference"),
    ("engine", "eval", "rl"),
    ("stages", "cli", "report", "__init__"),
]
MAX_LINES = 600
MAX_STAGE_LINES = 250


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def floor(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(FLOORS):
        if top in names:
            return i
    raise AssertionError(f"{module}: its top-level name {top!r} has no floor in FLOORS; add it")


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The lmforge module a dotted name lives in (a module, or the package whose attribute it is)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def imports(module: str, path: Path, known: dict[str, Path]):
    """(line, imported module, private names taken from it) for every lmforge import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    bound: dict[str, str] = {}  # local name -> lmforge module or object it refers to
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    target = resolve(alias.name, known)
                    found.append((node.lineno, target, []))
                    if alias.asname:
                        bound[alias.asname] = target
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                full = f"{source}.{alias.name}"
                target = full if full in known else resolve(source, known)
                private = [alias.name] if target != full and is_private(alias.name) else []
                found.append((node.lineno, target, private))
                bound[alias.asname or alias.name] = full
    for node in ast.walk(tree):  # module._name and ImportedClass._name
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                and is_private(node.attr)):
            found.append((node.lineno, resolve(bound[node.value.id], known), [node.attr]))
    return [(line, target, private) for line, target, private in found if target and target != module]


def graph():
    known = modules()
    edges: dict[str, dict[str, int]] = {m: {} for m in known}
    findings = {"back-up": [], "private": []}
    for module, path in known.items():
        where = path.relative_to(SRC.parent)
        for line, target, private in imports(module, path, known):
            edges[module].setdefault(target, line)
            if floor(target) > floor(module):
                findings["back-up"].append(f"{where}:{line}: {module} (floor {floor(module)}) imports {target} "
                                           f"(floor {floor(target)})")
            for name in private:
                findings["private"].append(f"{where}:{line}: {module} uses {target}.{name}")
    return known, edges, findings


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    known, edges, _ = graph()
    found = []
    for component in cycles(edges):
        members = set(component)
        for m in component:
            where = known[m].relative_to(SRC.parent)
            found += [f"{where}:{line}: {m} -> {t}" for t, line in edges[m].items() if t in members]
        found.append("")
    assert not found, "import cycles:\n" + "\n".join(found)


def test_every_import_points_down():
    _, _, findings = graph()
    assert not findings["back-up"], "imports from a lower floor to a higher one:\n" + "\n".join(findings["back-up"])


def test_no_private_names_across_modules():
    _, _, findings = graph()
    assert not findings["private"], "private names used across modules:\n" + "\n".join(findings["private"])


def test_file_sizes():
    known = modules()
    over = []
    for module, path in known.items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        limit = MAX_STAGE_LINES if module.startswith(f"{PACKAGE}.stages.") else MAX_LINES
        if n > limit:
            over.append(f"{path.relative_to(SRC.parent)}: {n} lines (limit {limit})")
    assert not over, "files over their size limit:\n" + "\n".join(over)


def test_the_checker_sees_a_planted_cycle_and_orders_floors():
    edges = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert floor(f"{PACKAGE}.models.hf") < floor(f"{PACKAGE}.eval.tasks") < floor(f"{PACKAGE}.stages.pretrain")
