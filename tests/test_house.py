"""The house rules of docs/design.md, checked against the code: no import circles, imports only
where the folder table allows them, and every import inside a function says why it is there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = (
    "collection",
    "curation",
    "models",
    "pipelines",
    "indices",
    "webui",
    "hdit_train",
    "bench",
    "tests",
)


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an imported name lives in (None: not ours)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> list[tuple[ast.stmt, str, bool]]:
    """(statement, project module imported, inside a function) for every import of `module`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((child, _resolve(a.name), inner) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                out.extend(
                    (child, _resolve(f"{base}.{a.name}") or _resolve(base), inner)
                    for a in child.names
                )
            visit(child, inner)

    visit(tree, False)
    return out


def _graph() -> dict[str, set[str]]:
    graph = {}
    for module in MODULES:
        deps = {target for _, target, _ in _imports(module) if target and target != module}
        if (
            MODULES[module].name == "__init__.py"
        ):  # a package importing its own submodules is no circle
            deps = {d for d in deps if d.rpartition(".")[0] != module}
        graph[module] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def _folder_table() -> list[tuple[list[str], list[str]]]:
    """(code, may import) rows of docs/design.md's folder table, as dotted names."""
    text = (REPO / "docs" / "design.md").read_text()
    section = text.split("## Folders", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        rows.append((re.findall(r"`([\w.]+)`", cells[0]), re.findall(r"`([\w.]+)`", cells[2])))
    return rows


def _row(module: str, rows: list[tuple[list[str], list[str]]]) -> tuple[str, list[str]]:
    """The most specific row whose code names this module or its folder: (that name, may import)."""
    best = ("", [])
    for codes, allowed in rows:
        for code in codes:
            if (module == code or module.startswith(code + ".")) and len(code) > len(best[0]):
                best = (code, allowed)
    return best


def test_no_import_circles_anywhere():
    assert _cycles(_graph()) == []


def test_every_import_is_allowed_by_the_folder_table():
    rows = _folder_table()
    assert len(rows) >= 8, "docs/design.md lost its folder table"
    wrong = []
    for module in MODULES:
        code, allowed = _row(module, rows)
        assert code, f"{module} has no row in docs/design.md's folder table"
        own_folder = code if "." not in code else None  # a folder row may import within itself
        for stmt, target, _ in _imports(module):
            if target is None or target == module:
                continue
            ok = (own_folder and target.split(".")[0] == own_folder) or any(
                target == a or target.startswith(a + ".") for a in allowed
            )
            if not ok:
                wrong.append(f"{MODULES[module].relative_to(REPO)}:{stmt.lineno} imports {target}")
    assert wrong == []


def test_bench_never_imports_tests():
    assert [
        m
        for m, deps in _graph().items()
        if m.startswith("bench") and any(d.startswith("tests") for d in deps)
    ] == []


def _says_why(lines: list[str], lineno: int, end_lineno: int | None = None) -> bool:
    """A comment on the import's lines (the formatter may move it to a wrapped import's last
    line), or on the line opening its group of imports."""
    if any("#" in line for line in lines[lineno - 1 : end_lineno or lineno]):
        return True
    i = lineno - 1
    while True:
        if "#" in lines[i]:
            return True
        i -= 1
        if i < 0 or not re.match(r"\s*(import |from \S+ import |$)", lines[i]):
            return i >= 0 and lines[i].strip().startswith("#")


def test_imports_inside_functions_say_why():
    """Module-top imports, except optional or heavy ones, each with a comment giving the reason."""
    silent = []
    for module, path in MODULES.items():
        if module.startswith("tests"):
            continue
        lines = path.read_text().splitlines()
        for stmt, _, nested in _imports(module):
            if nested and not _says_why(lines, stmt.lineno, stmt.end_lineno):
                silent.append(
                    f"{path.relative_to(REPO)}:{stmt.lineno}: {lines[stmt.lineno - 1].strip()}"
                )
    assert sorted(set(silent)) == []


@pytest.mark.parametrize(
    "package",
    ["collection", "curation", "models", "pipelines", "indices", "hdit_train", "webui", "bench"],
)
def test_no_file_over_600_lines(package):
    long = [
        f"{p.relative_to(REPO)}: {n}"
        for p in (REPO / package).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 600
    ]
    assert long == []
