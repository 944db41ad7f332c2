"""dvc.yaml cannot drift from the code, and the docs name only DVC stages that exist.

Code deps: a stage whose ``cmd`` is ``faceid <command> ...`` runs the CLI entry point (pyproject
``[project.scripts] faceid``), so its code is every first-party module that runs (tests/import_graph.py
``reach``, function level) from

- loading the CLI module and calling the entry point (``main``, the parser, what they call), with
  every registered handler left out,
- the handler registered for ``<command>``, read from the CLI's AST: the function that calls
  ``.add_parser(<name param>)`` and ``.set_defaults(handler=<handler param>)`` is the registrar; its
  calls give command -> handler (a loop over a tuple of names, as for ``train-lora`` / ``train``, too).

Function level: calling ``stages.crop_faces`` reaches what that function imports and calls, not every
function of ``faceid.stages``; a class reaches all its methods; the fallbacks are conservative (see
tests/import_graph.py). The code entries of the stage's ``deps`` (paths under a first-party package
folder: files, or folders = every module under them) must cover exactly those files: nothing missing,
nothing the stage does not run.

Fix drift in one command (rewrites only the code entries of each ``faceid`` stage's deps, text-level:
data deps, comments and the rest of dvc.yaml stay as they are)::

    .venv/bin/python tests/test_dvc_deps.py --write

(without ``--write`` it prints the diff and exits 1 when dvc.yaml drifted).
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
import sys
import tomllib
from functools import cache
from pathlib import Path

import yaml

import import_graph as ig

REPO = ig.REPO
DVC_YAML = REPO / "dvc.yaml"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
WRITE_COMMAND = ".venv/bin/python tests/test_dvc_deps.py --write"


# --------------------------------------------------------------------------- the CLI, read from its AST


@cache
def entry_point() -> tuple[str, str]:
    """``(module, function)`` of the ``faceid`` console script (pyproject.toml)."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["faceid"].partition(":")
    return module, func


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}


def _constant_strings(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> list[str]:
    """The command name(s) an argument stands for: a string, or a loop variable over a tuple/list of strings."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Name):
        scope = parents.get(node)
        while scope is not None:
            if (isinstance(scope, ast.For) and isinstance(scope.target, ast.Name) and scope.target.id == node.id
                    and isinstance(scope.iter, ast.Tuple | ast.List)
                    and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in scope.iter.elts)):
                return [e.value for e in scope.iter.elts]
            scope = parents.get(scope)
    raise AssertionError(f"{ig.module_path(entry_point()[0])}:{node.lineno}: cannot read the command name of a "
                         f"registration ({ast.unparse(node)}); extend tests/test_dvc_deps.py")


def _registrars(tree: ast.Module) -> dict[str, tuple[int, int]]:
    """``{function name: (command arg index, handler arg index)}`` of the functions that register a
    sub-command: they call ``X.add_parser(<param>, ...)`` and ``.set_defaults(handler=<param>)``."""
    found = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef):
            continue
        params = [a.arg for a in fn.args.args]
        name_param = handler_param = None
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr == "add_parser" and node.args and isinstance(node.args[0], ast.Name):
                    name_param = node.args[0].id
                if node.func.attr == "set_defaults":
                    for kw in node.keywords:
                        if kw.arg == "handler" and isinstance(kw.value, ast.Name):
                            handler_param = kw.value.id
        if name_param in params and handler_param in params:
            found[fn.name] = (params.index(name_param), params.index(handler_param))
    return found


@cache
def registrations() -> dict[str, ast.expr]:
    """``{command: handler expression}`` as the CLI module registers them."""
    module, _ = entry_point()
    tree = ig.parse(module)
    parents, registrars, found = _parents(tree), _registrars(tree), {}
    assert registrars, f"{ig.module_path(module)}: no function registers sub-commands (.set_defaults(handler=...))"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in registrars:
            name_i, handler_i = registrars[node.func.id]
            for command in _constant_strings(node.args[name_i], parents):
                found[command] = node.args[handler_i]
    return found


def _handler_units(expr: ast.expr) -> set[tuple[str, str | None]]:
    return ig.resolve(entry_point()[0], ast.unparse(expr))


def _all_handler_units() -> set[tuple[str, str | None]]:
    return set().union(*(_handler_units(h) for h in registrations().values()))


@cache
def common_code() -> frozenset[str]:
    """Modules every ``faceid`` command runs: the CLI module loading, the entry point (``main``, the
    parser), the functions they call; no handler."""
    module, main = entry_point()
    return frozenset(ig.modules_run([(module, None), (module, main)], exclude=_all_handler_units()))


@cache
def command_code(command: str) -> frozenset[str]:
    """Modules ``faceid <command>`` runs: :func:`common_code` and what its handler reaches (function
    level: tests/import_graph.py ``reach``)."""
    module, main = entry_point()
    own = _handler_units(registrations()[command])
    assert own, f"{command}: cannot resolve its handler {ast.unparse(registrations()[command])} in {module}"
    return frozenset(ig.modules_run([(module, None), (module, main), *own], exclude=_all_handler_units() - own))


def stage_command(cmd) -> str | None:
    """The sub-command of a ``faceid ...`` stage cmd (global options before it skipped), else None."""
    if isinstance(cmd, list):
        assert len(cmd) == 1, f"multi-command stages are not supported here: {cmd}"
        cmd = cmd[0]
    words = shlex.split(cmd)
    if not words or words[0] != "faceid":
        return None
    commands = registrations()
    for word in words[1:]:
        if word in commands:
            return word
    raise AssertionError(f"{cmd!r}: no faceid sub-command in it (known: {sorted(commands)})")


# --------------------------------------------------------------------------- dvc.yaml code entries


def load_dvc(text: str | None = None) -> dict:
    return yaml.safe_load(DVC_YAML.read_text() if text is None else text)


def faceid_stages(dvc: dict) -> dict[str, str]:
    """``{stage: faceid sub-command}`` for the stages that run ``faceid``."""
    out = {}
    for name, stage in dvc["stages"].items():
        assert "foreach" not in stage and "matrix" not in stage, f"{name}: foreach/matrix stages not supported here"
        if (command := stage_command(stage["cmd"])) is not None:
            out[name] = command
    return out


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def is_code_entry(entry) -> bool:
    """A dep that is a path inside a first-party package folder (``faceid/...``)."""
    if not isinstance(entry, str) or "${" in entry:
        return False
    path = (REPO / entry).resolve()
    return any(_inside(path, root) for root in ig.package_roots().values())


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def covered_by(entry: str) -> set[str]:
    """First-party modules a code entry covers: the file's module, or every module under the folder."""
    path = (REPO / entry).resolve()
    if path.is_dir():
        return {m for m in ig.modules(ig.package_roots()) if _inside(ig.module_path(m), path)}
    if path.suffix == ".py" and path.is_file():
        return {ig.module_name(path)}
    return set()


def expected_entries(mods: set[str] | frozenset[str]) -> list[str]:
    """The deps list for ``mods``: a folder where every module under it is in ``mods`` (largest such
    folder), otherwise the files; sorted."""
    all_mods = ig.modules(ig.package_roots())
    folders = {ig.module_path(m).parent for m in all_mods if ig.is_package(m)}

    def full(folder: Path) -> bool:
        return all(m in mods for m in all_mods if _inside(ig.module_path(m), folder))

    chosen = {f for f in folders if full(f) and not (f.parent in folders and full(f.parent))}
    files = {ig.module_path(m) for m in mods if not any(_inside(ig.module_path(m), f) for f in chosen)}
    return sorted(_rel(p) for p in chosen | files)


def check_stage(stage: dict, command: str) -> list[str]:
    """Problems of one stage's code deps (empty: exact)."""
    expected = set(command_code(command))
    entries = [e for e in stage.get("deps", []) if is_code_entry(e)]
    problems, seen = [], set()
    for entry in entries:
        path = REPO / entry
        cover = covered_by(entry)
        if not path.exists():
            problems.append(f"{entry}: does not exist")
        elif path.is_dir() and not cover:
            problems.append(f"{entry}: a folder without modules")
        elif extra := sorted(cover - expected):
            problems.append(f"{entry}: the stage does not import " + ", ".join(_rel(ig.module_path(m)) for m in extra))
        if cover & seen:
            problems.append(f"{entry}: listed twice (overlaps another entry)")
        seen |= cover
    if missing := sorted(expected - seen):
        problems.append("missing: " + ", ".join(_rel(ig.module_path(m)) for m in missing))
    return problems


# --------------------------------------------------------------------------- the generator (text-level)

_ITEM = re.compile(r"^(?P<indent>\s*)-\s+(?P<value>.*?)(?P<comment>\s+#.*)?$")


def _item_value(line: str) -> tuple[str, str, str] | None:
    """``(indent, value, comment)`` of a one-line block-list item, else None."""
    m = _ITEM.match(line.rstrip("\n"))
    if not m:
        return None
    return m["indent"], yaml.safe_load(m["value"]), m["comment"] or ""


def _deps_block(lines: list[str], stage: str) -> tuple[int, int]:
    """``[start, end)`` line range of the items of ``stages: <stage>: deps:`` in dvc.yaml."""
    def indent(line: str) -> int:
        return len(line) - len(line.lstrip(" "))

    def blank(line: str) -> bool:
        return not line.strip() or line.lstrip().startswith("#")

    i = next(i for i, line in enumerate(lines) if line.rstrip() == "stages:")
    stage_i = next(j for j in range(i + 1, len(lines))
                   if not blank(lines[j]) and lines[j].strip() == f"{stage}:" and indent(lines[j]) > 0)
    level = indent(lines[stage_i])
    end_stage = next((j for j in range(stage_i + 1, len(lines)) if not blank(lines[j]) and indent(lines[j]) <= level),
                     len(lines))
    deps_i = next(j for j in range(stage_i + 1, end_stage) if lines[j].strip() == "deps:")
    deps_level = indent(lines[deps_i])
    end = next((j for j in range(deps_i + 1, end_stage) if not blank(lines[j]) and indent(lines[j]) <= deps_level),
               end_stage)
    while end > deps_i + 1 and not lines[end - 1].strip():
        end -= 1
    return deps_i + 1, end


def rewrite(text: str) -> str:
    """dvc.yaml with the code entries of every ``faceid`` stage's deps replaced by the expected ones.
    Data entries, their comments and everything else keep their text; a code entry that stays keeps
    its comment. New code entries go where the first code entry was (after the data entries if none)."""
    lines = text.splitlines(keepends=True)
    dvc = load_dvc(text)
    for stage, command in faceid_stages(dvc).items():
        start, end = _deps_block(lines, stage)
        block, code_at, comments, indent = lines[start:end], None, {}, None
        kept = []
        for line in block:
            item = _item_value(line) if line.lstrip().startswith("-") else None
            if item is None:
                assert not line.strip() or line.lstrip().startswith("#"), \
                    f"dvc.yaml {stage} deps: cannot rewrite the line {line!r} (one-line `- entry` items only)"
                kept.append(line)
                continue
            indent = item[0]
            if is_code_entry(item[1]):
                code_at = len(kept) if code_at is None else code_at
                comments[item[1]] = item[2]
            else:
                kept.append(line)
        indent = indent if indent is not None else " " * 6
        new = [f"{indent}- {e}{comments.get(e, '')}\n" for e in expected_entries(command_code(command))]
        if code_at is None:
            code_at = max((k + 1 for k, line in enumerate(kept) if line.lstrip().startswith("-")), default=0)
        lines[start:end] = kept[:code_at] + new + kept[code_at:]
    out = "".join(lines)
    _check_rewrite(dvc, load_dvc(out))
    return out


def _check_rewrite(old: dict, new: dict) -> None:
    """Only code entries of deps changed."""
    def strip(dvc: dict) -> dict:
        dvc = yaml.safe_load(yaml.safe_dump(dvc))
        for stage in dvc["stages"].values():
            if "deps" in stage:
                stage["deps"] = [e for e in stage["deps"] if not is_code_entry(e)]
        return dvc

    assert strip(old) == strip(new), "the rewrite changed more than code deps (a bug in tests/test_dvc_deps.py)"


# --------------------------------------------------------------------------- tests: code deps, params


def test_the_cli_registry_read_from_the_ast_is_the_real_one():
    """The AST reading of the parser (command -> handler) agrees with the parser the CLI builds."""
    import importlib

    module, _ = entry_point()
    cli = importlib.import_module(module)
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    real = {name: p.get_default("handler") for name, p in sub.choices.items()}
    assert set(real) == set(registrations()), "commands seen in the AST differ from the parser's"
    for name, handler in real.items():
        expr = registrations()[name]
        assert ast.unparse(expr).split(".")[-1] == handler.__name__, f"{name}: AST says {ast.unparse(expr)}"


def test_every_faceid_stage_lists_exactly_the_code_it_runs():
    dvc = load_dvc()
    stages = faceid_stages(dvc)
    assert stages, "dvc.yaml: no stage runs `faceid ...`"
    report = []
    for name, command in stages.items():
        if problems := check_stage(dvc["stages"][name], command):
            listing = "\n".join(f"      - {e}" for e in expected_entries(command_code(command)))
            report.append(f"stage {name} (faceid {command}):\n  " + "\n  ".join(problems)
                          + f"\n  expected code deps:\n{listing}")
    assert not report, "dvc.yaml code deps drifted; fix with `" + WRITE_COMMAND + "`\n\n" + "\n\n".join(report)


def test_the_generator_is_a_fixed_point_and_keeps_data_deps():
    """``--write`` on the current dvc.yaml changes nothing (the deps are exact) and keeps data lines."""
    text = DVC_YAML.read_text()
    assert rewrite(text) == text, f"dvc.yaml is not what `{WRITE_COMMAND}` writes; run it"


def test_the_generator_repairs_drift_without_touching_data_lines():
    """A missing module and a stale entry: the test names both, ``--write`` restores dvc.yaml exactly."""
    text = DVC_YAML.read_text()
    lines = text.splitlines(keepends=True)
    dvc = load_dvc(text)
    stage, command = next(iter(faceid_stages(dvc).items()))
    start, end = _deps_block(lines, stage)
    code = [i for i in range(start, end) if (it := _item_value(lines[i])) and is_code_entry(it[1])]
    drop = next(i for i in code[1:] if "#" not in lines[i])
    dropped = _item_value(lines[drop])[1]
    stale = lines[code[0]].split("- ")[0] + "- faceid/no_such_module.py\n"
    drifted = lines[: code[0] + 1] + [stale] + [line for i, line in enumerate(lines) if i > code[0] and i != drop]
    problems = check_stage(load_dvc("".join(drifted))["stages"][stage], command)
    assert any("faceid/no_such_module.py: does not exist" in p for p in problems), problems
    assert any(p.startswith("missing: ") and dropped in p for p in problems), problems
    assert rewrite("".join(drifted)) == text


def test_params_sections_exist():
    """Every ``params:`` entry of every stage names a section (or dotted key) that exists."""
    dvc = load_dvc()
    files: dict[str, dict] = {}

    def has(tree, key: str) -> bool:
        for part in key.split("."):
            if not isinstance(tree, dict) or part not in tree:
                return False
            tree = tree[part]
        return True

    bad = []
    for name, stage in dvc["stages"].items():
        for entry in stage.get("params", []):
            for file, keys in (entry.items() if isinstance(entry, dict) else [("params.yaml", [entry])]):
                tree = files.setdefault(file, yaml.safe_load((REPO / file).read_text()))
                bad += [f"{name}: {file}: {k}" for k in (keys or []) if not has(tree, k)]
    assert not bad, "params named in dvc.yaml but missing from the params file:\n" + "\n".join(bad)


def test_every_cli_stage_reads_the_config_module():
    """A sanity anchor for the closure: every faceid stage runs faceid.config (load_params in main)."""
    for command in set(faceid_stages(load_dvc()).values()):
        assert "faceid.config" in command_code(command)
        assert "faceid.errors" in command_code(command)


# --------------------------------------------------------------------------- tests: docs name real DVC stages


def stage_like_names() -> set[str]:
    """Names that look like a stage: every CLI command in snake_case, every DVC stage."""
    return {c.replace("-", "_") for c in registrations() if "-" in c} | set(load_dvc()["stages"])


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every table (rows of cells; header first, separator row dropped) outside code fences."""
    tables, current, fenced = [], [], False
    for line in text.splitlines() + [""]:
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and line.lstrip().startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def dvc_stage_columns(text: str) -> list[tuple[str, list[set[str]]]]:
    """``[(header, backticked names per row)]`` of every table column whose header names DVC stages."""
    found = []
    for table in markdown_tables(text):
        for i, header in enumerate(table[0]):
            if re.search(r"\bDVC stage", header, re.I):
                found.append((header, [set(re.findall(r"`([^`]+)`", row[i])) if i < len(row) else set()
                                       for row in table[1:]]))
    return found


_DVC_CONTEXT = re.compile(r"DVC stage|dvc\.yaml|dvc repro|DVC DAG", re.I)


def prose_stage_mentions(text: str, names: set[str]) -> list[tuple[int, str, str]]:
    """``[(line, name, the paragraph)]``: stage-like names in paragraphs (or code lines) that talk
    about DVC stages (``DVC stage``, ``dvc.yaml``, ``dvc repro``). Tables are checked by column instead;
    dotted keys (``batch_infer.face_scale``: params) and paths (``components/batch_infer.py``) are not names."""
    word = re.compile(r"(?<![\w./-])(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True))
                      + r")(?![\w-]|\.\w)")
    mentions, paragraph, start, fenced = [], [], 0, False

    def flush():
        joined = "\n".join(paragraph)
        if paragraph and _DVC_CONTEXT.search(joined):
            for k, line in enumerate(paragraph):
                mentions.extend((start + k + 1, m, joined) for m in word.findall(line))

    for n, line in enumerate(text.splitlines()):
        if line.lstrip().startswith("```"):
            flush()
            paragraph, fenced = [], not fenced
            continue
        if fenced:  # code: line by line
            if _DVC_CONTEXT.search(line):
                mentions.extend((n + 1, m, line) for m in word.findall(line))
            continue
        if not line.strip() or line.lstrip().startswith("|") or line.startswith("#"):
            flush()
            paragraph, start = [], n + 1
            continue
        if not paragraph:
            start = n
        paragraph.append(line)
    flush()
    return mentions


def doc_problems(path_text: dict[str, str], stages: set[str], names: set[str]) -> list[str]:
    problems, columns = [], 0
    for path, text in path_text.items():
        for header, rows in dvc_stage_columns(text):
            columns += 1
            named = set().union(*rows) if rows else set()
            if unknown := sorted(named - stages):
                problems.append(f"{path}: table column '{header}' names {unknown}, not stages of dvc.yaml")
            if absent := sorted(stages - named):
                problems.append(f"{path}: table column '{header}' leaves out the dvc.yaml stages {absent}")
        for line, name, _ in prose_stage_mentions(text, names):
            if name not in stages:
                problems.append(f"{path}:{line}: `{name}` named where the text is about DVC stages; "
                                f"dvc.yaml has no such stage (stages: {sorted(stages)})")
    if not columns:
        problems.append("no docs table has a 'DVC stage' column (docs/architecture.md should); the check would be empty")
    return problems


def _docs() -> dict[str, str]:
    return {_rel(p): p.read_text() for p in DOCS if p.is_file()}


def test_docs_name_only_dvc_stages_that_exist():
    stages = set(load_dvc()["stages"])
    problems = doc_problems(_docs(), stages, stage_like_names())
    assert not problems, "\n".join(problems)


def test_the_docs_check_bites():
    """The check above fails on the kind of text the issue found (a `batch_infer` DVC stage)."""
    stages = set(load_dvc()["stages"])
    names = stage_like_names()
    table = ("| module | CLI | DVC stage + KFP component |\n|---|---|---|\n"
             + "".join(f"| m | c | `{s}` |\n" for s in sorted(stages)) + "| `faceid/batch.py` | b | `batch_infer` |\n")
    assert any("batch_infer" in p for p in doc_problems({"t.md": table}, stages, names))
    prose = "| DVC stage |\n|---|\n" + "".join(f"| `{s}` |\n" for s in sorted(stages))
    prose += "\n`dvc.yaml` runs sample_data, batch_infer and train_lora.\n"
    assert [p for p in doc_problems({"t.md": prose}, stages, names) if "batch_infer" in p]
    ok = prose.replace("batch_infer", "crop_faces") + "\nKFP components batch_infer and train_lora (params `batch_infer.seed`).\n"
    assert doc_problems({"t.md": ok}, stages, names) == []


# --------------------------------------------------------------------------- the generator command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="check or rewrite the code deps of dvc.yaml's faceid stages")
    parser.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps in place")
    args = parser.parse_args(argv)
    text = DVC_YAML.read_text()
    new = rewrite(text)
    if new == text:
        print("dvc.yaml: code deps up to date")
        return 0
    if args.write:
        DVC_YAML.write_text(new)
        print("dvc.yaml: code deps rewritten")
        return 0
    import difflib

    sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), "dvc.yaml", "dvc.yaml (expected)"))
    print(f"\ndvc.yaml: code deps drifted; run `{WRITE_COMMAND}`")
    return 1


if __name__ == "__main__":
    sys.exit(main())
