"""First-party import graph of the repository, read from the source (AST), nothing imported.

A first-party module is a ``.py`` file of a first-party package: ``faceid`` and, where they exist,
``faceid_pipelines`` / ``faceid_components`` (the repository's ``pipelines/`` and ``components/``
folders, should they be installed under those names through ``package-dir``). Where each package
lives is read from pyproject.toml's ``[tool.setuptools] package-dir``, else a folder of that name at
the repository root, else an importable package inside the repository.

API (module names are dotted, e.g. ``faceid.faces.crop``; a package is its ``__init__.py``):

- :func:`module_imports` ``(name) -> set[str]``: the first-party modules ``name`` imports, from every
  ``import`` / ``from ... import`` statement anywhere in it (also inside functions, classes and
  ``if TYPE_CHECKING:``), relative imports resolved, ``from pkg import sub`` resolved to ``pkg.sub``
  when ``sub`` is a module (else to ``pkg``), plus ``importlib.import_module("literal")`` calls.
  Parent packages are not listed (see :func:`closure`).
- :func:`imports_in` ``(name, nodes) -> set[str]``: the same for some AST nodes of module ``name``
  (e.g. one function; :func:`parse` gives the tree).
- :func:`closure` ``(roots) -> set[str]``: ``roots`` and every first-party module they import,
  transitively, with the parent packages Python runs on the way (importing ``a.b.c`` runs
  ``a/__init__.py`` and ``a/b/__init__.py``).
- :func:`module_path` ``(name) -> Path``; :func:`module_name` ``(path) -> str``; :func:`modules`
  ``(packages) -> list[str]``; :func:`package_roots` ``() -> {package: folder}``.
- :func:`import_graph` ``(packages=("faceid",)) -> {module: imported modules}`` over the modules of
  ``packages``, edges kept within them (for cycle checks and the like).

Function level (what actually runs; tests/test_dvc_deps.py uses it for dvc.yaml's code deps): a unit
is ``(module, None)`` (loading it) or ``(module, name)`` (calling a top-level function / using a
top-level class). :func:`reach` ``(roots, exclude=()) -> set[unit]``, :func:`modules_run` ``(roots,
exclude=()) -> set[str]``, :func:`resolve` ``(module, "mod.func") -> set[unit]``, :func:`whole`
``(module) -> set[unit]``, :func:`symbols` ``(module)``: its top-level names. Rules: see the section below.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = ("faceid", "faceid_pipelines", "faceid_components")


@functools.cache
def package_roots() -> dict[str, Path]:
    """``{top-level package: its folder}`` for the first-party packages that exist in this repository."""
    mapping: dict[str, str] = {}
    pyproject = REPO / "pyproject.toml"
    if pyproject.is_file():
        setuptools = tomllib.loads(pyproject.read_text()).get("tool", {}).get("setuptools", {})
        mapping = {k: v for k, v in (setuptools.get("package-dir") or {}).items() if k}
    roots = {}
    for name in FIRST_PARTY:
        candidates = [REPO / mapping[name]] if name in mapping else []
        candidates.append(REPO / name)
        try:
            spec = importlib.util.find_spec(name)  # top-level: finds, does not import
        except (ImportError, ValueError):
            spec = None
        candidates += [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
        for folder in candidates:
            folder = folder.resolve()
            if (folder / "__init__.py").is_file() and (folder == REPO or REPO in folder.parents):
                roots[name] = folder
                break
    return roots


@functools.cache
def _index() -> tuple[dict[str, Path], dict[Path, str]]:
    by_name: dict[str, Path] = {}
    for package, folder in package_roots().items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder)
            if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
                continue
            parts = [package, *rel.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            by_name[".".join(parts)] = path
    return by_name, {p: n for n, p in by_name.items()}


def is_first_party(name: str) -> bool:
    return name in _index()[0]


def module_path(name: str) -> Path:
    """The file of first-party module ``name`` (``__init__.py`` for a package)."""
    try:
        return _index()[0][name]
    except KeyError:
        raise KeyError(f"{name}: not a first-party module (packages: {sorted(package_roots())})") from None


def module_name(path: str | Path) -> str:
    """The module name of a first-party ``.py`` file (absolute, or relative to the repository root)."""
    path = Path(path)
    path = (path if path.is_absolute() else REPO / path).resolve()
    try:
        return _index()[1][path]
    except KeyError:
        raise KeyError(f"{path}: not a first-party module file") from None


def is_package(name: str) -> bool:
    return module_path(name).name == "__init__.py"


def modules(packages: Iterable[str] = ("faceid",)) -> list[str]:
    """Every first-party module in ``packages`` (and their sub-packages), sorted."""
    packages = tuple(packages)
    return sorted(n for n in _index()[0] if any(n == p or n.startswith(p + ".") for p in packages))


@functools.cache
def parse(name: str) -> ast.Module:
    path = module_path(name)
    return ast.parse(path.read_text(), filename=str(path))


def _resolve_from(name: str, node: ast.ImportFrom) -> str | None:
    """The absolute module a ``from X import ...`` statement in module ``name`` names."""
    if not node.level:
        return node.module
    package = name if is_package(name) else name.rpartition(".")[0]
    parts = package.split(".")
    if node.level - 1 >= len(parts):
        raise ImportError(f"{module_path(name)}:{node.lineno}: relative import beyond the top-level package")
    base = ".".join(parts[: len(parts) - (node.level - 1)])
    return f"{base}.{node.module}" if node.module else base


def _first_party(target: str) -> str | None:
    """``target`` or, when it is not a module itself (``a.b.attr``), the nearest first-party module above it."""
    while target:
        if is_first_party(target):
            return target
        target = target.rpartition(".")[0]
    return None


def imports_in(name: str, nodes: Iterable[ast.AST]) -> set[str]:
    """First-party modules imported by the statements in ``nodes`` (and everything inside them) of module ``name``."""
    found: set[str] = set()

    def add(target: str | None) -> None:
        if target and (module := _first_party(target)):
            found.add(module)

    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(name, node)
                if base == "__future__" or base is None:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    add(sub if alias.name != "*" and is_first_party(sub) else base)
            elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                    add(node.args[0].value)
    found.discard(name)
    return found


def module_imports(name: str) -> set[str]:
    """First-party modules that module ``name`` imports anywhere in its source (see the module docstring)."""
    return imports_in(name, [parse(name)])


def parents(name: str) -> list[str]:
    """The packages Python runs before ``name``: ``a.b.c`` -> ``["a", "a.b"]`` (first-party ones only)."""
    parts = name.split(".")
    return [p for p in (".".join(parts[:i]) for i in range(1, len(parts))) if is_first_party(p)]


def closure(roots: Iterable[str]) -> set[str]:
    """``roots`` and every first-party module they import, transitively, with their parent packages."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        module_path(name)  # a clear KeyError for a root that is not first-party
        seen.add(name)
        todo += parents(name)
        todo += module_imports(name)
    return seen


def import_graph(packages: Iterable[str] = ("faceid",)) -> dict[str, set[str]]:
    """``{module: the modules it imports}`` for every module of ``packages``, edges kept within ``packages``."""
    names = modules(packages)
    inside = set(names)
    return {n: module_imports(n) & inside for n in names}


# --------------------------------------------------------------------------- what runs: function level
#
# A unit is ``(module, None)``: loading the module (its top-level statements: imports, definitions,
# decorators, default values, class bodies, ``if __name__ == "__main__":``), or ``(module, name)``: calling
# the top-level function ``name`` / using the top-level class ``name`` (every method of it). Reaching a
# unit reaches: loading its module (and the parent packages), the modules its import statements load,
# and the units its names resolve to (``f``, ``mod.f``, ``pkg.sub.Class``, names imported from other
# modules, re-exports followed). Conservative fallbacks: a module used as a value (not ``mod.attr``), an
# attribute a module does not define, ``from m import *``, ``import_module("m")`` or a string that is a
# first-party module name (``python -m m``): every unit of that module. A name in a function counts as a
# call even when it is only passed on (callbacks, Ray workers).


def _statements(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Top-level statements, entering compound statements (if/try/with/for/while), not definitions."""
    for node in body:
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            for field in ("body", "orelse", "finalbody"):
                yield from _statements(getattr(node, field, None) or [])
            for handler in getattr(node, "handlers", None) or []:
                yield from _statements(handler.body)
            for case in getattr(node, "cases", None) or []:
                yield from _statements(case.body)


def _bindings(name: str, nodes: Iterable[ast.AST]) -> dict[str, tuple]:
    """Names bound by the import statements in ``nodes``: ``("module", m)`` or ``("from", m, attr)``."""
    out: dict[str, tuple] = {}
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname:
                        out[alias.asname] = ("module", alias.name)
                    else:
                        out[alias.name.partition(".")[0]] = ("module", alias.name.partition(".")[0])
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(name, node)
                if base and base != "__future__":
                    for alias in node.names:
                        if alias.name != "*":
                            out[alias.asname or alias.name] = ("from", base, alias.name)
    return out


@functools.cache
def symbols(name: str) -> dict[str, tuple]:
    """Top-level names of module ``name``: ``("function",)``, ``("class",)``, ``("value",)`` or an import binding."""
    out: dict[str, tuple] = {}
    for node in _statements(parse(name).body):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out[node.name] = ("function",)
        elif isinstance(node, ast.ClassDef):
            out[node.name] = ("class",)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            out.update(_bindings(name, [node]))
        else:
            for target in ast.walk(node):
                if isinstance(target, ast.Name) and isinstance(target.ctx, ast.Store):
                    out.setdefault(target.id, ("value",))
    return out


def _definition(name: str, symbol: str) -> list[ast.AST]:
    return [n for n in _statements(parse(name).body)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and n.name == symbol]


def _load_nodes(name: str) -> list[ast.AST]:
    """What runs when module ``name`` loads: top-level statements; of a def only its decorators and
    defaults; of a class its bases, decorators and body without the method bodies."""
    out: list[ast.AST] = []

    def add(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out.extend(node.decorator_list)
            out.extend(d for d in [*node.args.defaults, *node.args.kw_defaults] if d is not None)
        elif isinstance(node, ast.ClassDef):
            out.extend([*node.decorator_list, *node.bases, *node.keywords])
            for child in node.body:
                add(child)
        else:
            out.append(node)

    for node in parse(name).body:
        add(node)
    return out


def whole(name: str) -> set[tuple[str, str | None]]:
    """Every unit of module ``name``."""
    return {(name, None)} | {(name, s) for s, kind in symbols(name).items() if kind[0] in ("function", "class")}


def _chains(node: ast.AST) -> Iterator[list[str]]:
    """Maximal ``name.attr.attr`` chains in ``node``, as lists of names."""
    def chain(n: ast.AST) -> list[str] | None:
        if isinstance(n, ast.Name):
            return [n.id]
        if isinstance(n, ast.Attribute) and (head := chain(n.value)) is not None:
            return [*head, n.attr]
        return None

    if (found := chain(node)) is not None:
        yield found
        return
    for child in ast.iter_child_nodes(node):
        yield from _chains(child)


def _in_module(module: str, rest: list[str], depth: int = 0) -> set[tuple[str, str | None]]:
    """Units reached by ``module.rest[0].rest[1]...``."""
    if depth > 20:
        return whole(module)
    if not rest:
        return whole(module)  # the module itself is used as a value
    head, tail = rest[0], rest[1:]
    if is_first_party(f"{module}.{head}"):
        return {(module, None)} | _in_module(f"{module}.{head}", tail, depth + 1)
    kind = symbols(module).get(head)
    if kind is None:
        return whole(module)  # not defined at top level: dynamic, be conservative
    return {(module, None)} | _resolve(module, kind, head, tail, depth + 1)


def _resolve(module: str, binding: tuple, symbol: str, rest: list[str], depth: int = 0) -> set[tuple[str, str | None]]:
    if binding[0] in ("function", "class"):
        return {(module, symbol)}
    if binding[0] == "module":
        target = _first_party(binding[1])
        return _in_module(target, rest, depth) if target == binding[1] else set()
    if binding[0] == "from":
        base, attr = binding[1], binding[2]
        if not is_first_party(base):
            return set()
        return _in_module(base, [attr, *rest], depth)
    return set()  # a value: loading its module covers it


def _loaded_by(name: str, nodes: Iterable[ast.AST]) -> set[tuple[str, str | None]]:
    """Modules loaded by the import statements in ``nodes`` (``from pkg import sub``: ``pkg`` and ``pkg.sub``)."""
    out: set[tuple[str, str | None]] = set()
    for top in nodes:
        for node in ast.walk(top):
            if isinstance(node, ast.Import):
                out |= {(m, None) for a in node.names if (m := _first_party(a.name))}
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_from(name, node)
                if base and (m := _first_party(base)):
                    out.add((m, None))
                    for alias in node.names:
                        if alias.name == "*":
                            out |= whole(m)
                        elif is_first_party(sub := f"{base}.{alias.name}"):
                            out.add((sub, None))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and is_first_party(node.value):
                out |= whole(node.value)  # import_module("m"), python -m m
            elif (file := _py_file(node)) is not None:
                out |= whole(file)  # a module named by its file (MLflow models-from-code, runpy)
    return out


def _py_file(node: ast.AST) -> str | None:
    """The first-party module a ``"x/y.py"`` string or a ``... / "y" / "z.py"`` path expression names,
    when exactly one module file ends with those parts."""
    parts: list[str] = []
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        operands, n = [], node
        while isinstance(n, ast.BinOp) and isinstance(n.op, ast.Div):
            operands.insert(0, n.right)
            n = n.left
        for operand in reversed(operands):
            if not (isinstance(operand, ast.Constant) and isinstance(operand.value, str)):
                break
            parts[:0] = operand.value.split("/")
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "\n" not in node.value:
        parts = node.value.split("/")
    if not parts or not parts[-1].endswith(".py") or parts[-1] == "__init__.py" and len(parts) < 2:
        return None
    found = [m for m, path in _index()[0].items() if list(path.parts[-len(parts):]) == parts]
    return found[0] if len(found) == 1 else None


@functools.cache
def unit_edges(unit: tuple[str, str | None]) -> frozenset[tuple[str, str | None]]:
    """The units one unit reaches directly."""
    module, symbol = unit
    if symbol is None:
        nodes = _load_nodes(module)
        out = {(p, None) for p in parents(module)}
        local: dict[str, tuple] = {}
    else:
        nodes = _definition(module, symbol)
        if not nodes:
            return frozenset(whole(module))
        out = {(module, None)}
        local = _bindings(module, nodes)
    out |= _loaded_by(module, nodes)
    table = symbols(module)
    for node in nodes:
        for path in _chains(node):
            binding = local.get(path[0]) or table.get(path[0])
            if binding and not (symbol is None and binding[0] == "value"):
                out |= _resolve(module, binding, path[0], path[1:])
    out.discard(unit)
    return frozenset(out)


def reach(roots: Iterable[tuple[str, str | None]], exclude: Iterable[tuple[str, str | None]] = ()) -> set[tuple[str, str | None]]:
    """Every unit reachable from ``roots``, never entering ``exclude``."""
    excluded, seen = set(exclude), set()
    todo = [r for r in roots if r not in excluded]
    while todo:
        unit = todo.pop()
        if unit in seen:
            continue
        module_path(unit[0])
        seen.add(unit)
        todo += [u for u in unit_edges(unit) if u not in seen and u not in excluded]
    return seen


def modules_run(roots: Iterable[tuple[str, str | None]], exclude: Iterable[tuple[str, str | None]] = ()) -> set[str]:
    """First-party modules whose code runs from ``roots`` (function-level :func:`reach`)."""
    return {module for module, _ in reach(roots, exclude)}


def resolve(module: str, dotted: str) -> set[tuple[str, str | None]]:
    """Units that the expression ``dotted`` (``f``, ``mod.f``, ``pkg.sub.Class``) in module ``module`` names."""
    path = dotted.split(".")
    binding = symbols(module).get(path[0])
    return _resolve(module, binding, path[0], path[1:]) if binding else set()
