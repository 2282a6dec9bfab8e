"""The house rules of the layout (issue #25) and of the shared material in CI (issue #24).

Every command the docs name answers --help; the package's import graph has no cycle; modules, functions and commands
stay small; the package imports nothing from benchmarks/ or tests/ and never reaches for ../shared; a test that needs
../shared fails in CI where it is absent, and skips elsewhere.
"""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "vit_hf"
BENCHMARKS = REPO / "benchmarks"
TESTS = REPO / "tests"

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 50
# The converter's whole key mapping: one table, read key by key against the official checkpoint's layout.
LONG_FUNCTIONS_ALLOWED = {"npz_to_state_dict"}
MAX_COMMAND_LINES = 150
MAX_TOP_LEVEL_MODULES = 12

# `python -m vit_hf.x`, `accelerate launch -m vit_hf.x`, `torchrun ... -m vit_hf.x`; a placeholder (vit_hf.<name>)
# is no command.
MODULE_COMMAND = re.compile(r"(?<![\w-])-m\s+(vit_hf(?:\.\w+)+)")
SCRIPT_COMMAND = re.compile(r"\bpython3?\s+(benchmarks/[\w/]+\.py)\b")
# A file of the repository named in the docs: vit_hf/..., benchmarks/..., recipes/..., ...
REPO_PATH = re.compile(r"(?<![\w/.~-])((?:vit_hf|benchmarks|recipes|accelerate_configs|tests|docs)/[\w./-]*\w)")


def _docs() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _named_in_docs(pattern: re.Pattern) -> dict[str, list[str]]:
    """What PATTERN's group captures in the docs, each with the places (file:line) that name it."""
    found = {}
    for doc in _docs():
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            for match in pattern.finditer(line):
                places = found.setdefault(match.group(1), [])
                if f"{doc.relative_to(REPO)}:{number}" not in places:
                    places.append(f"{doc.relative_to(REPO)}:{number}")
    return found


def _package_modules() -> dict[str, Path]:
    """Every module of vit_hf by dotted name; a package by its own name (its __init__.py)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_command(tree: ast.Module) -> bool:
    """A module with a top-level `main` and an `if __name__ == "__main__"` block."""
    has_main = any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body)
    guard = any(isinstance(node, ast.If) and "__name__" in ast.unparse(node.test) for node in tree.body)
    return has_main and guard


def _command_modules() -> list[str]:
    return sorted(f"vit_hf.{path.stem}" for path in PACKAGE.glob("*.py") if _is_command(ast.parse(path.read_text())))


def _benchmark_scripts() -> list[str]:
    return sorted(
        str(path.relative_to(REPO)) for path in BENCHMARKS.glob("*.py") if _is_command(ast.parse(path.read_text()))
    )


# ----------------------------------------------------------------------------------------------------------
# Every command answers --help


# One process imports torch and the Hugging Face libraries once for all the commands, each run as `python -m` and
# `python SCRIPT` run it (its folder first on sys.path), its stdout captured.
HELP_RUNNER = r"""
import contextlib, io, json, os, runpy, sys, traceback, warnings
results = {}
for kind, target in json.loads(sys.argv[1]):
    out, code, error = io.StringIO(), 0, ""
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [target, "--help"]
    if kind == "script":
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
    try:
        with contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy's note on a module its package imported
            if kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        error = "" if code == 0 else str(exit.code)
    except BaseException as exception:
        code, error = 1, "".join(traceback.format_exception_only(exception)).strip()
    finally:
        sys.argv, sys.path = saved_argv, saved_path
    results[target] = {"code": code, "usage": "usage:" in out.getvalue(), "error": error}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def help_answers() -> dict[str, dict]:
    """The --help answer of every command the docs name, every command module and every benchmark script."""
    modules = set(_named_in_docs(MODULE_COMMAND)) | set(_command_modules())
    scripts = set(_named_in_docs(SCRIPT_COMMAND)) | set(_benchmark_scripts())
    targets = [["module", name] for name in sorted(modules)] + [["script", path] for path in sorted(scripts)]
    done = subprocess.run(
        [sys.executable, "-c", HELP_RUNNER, json.dumps(targets)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _help_failures(answers: dict[str, dict], targets: dict[str, list[str]]) -> list[str]:
    failures = []
    for target, places in sorted(targets.items()):
        answer = answers[target]
        if answer["code"] != 0 or not answer["usage"]:
            why = answer["error"] or ("exit code 0 but no usage printed" if answer["code"] == 0 else "")
            failures.append(f"{target} --help (named at {', '.join(places)}): exit code {answer['code']}: {why}")
    return failures


def test_every_command_the_docs_name_answers_help(help_answers):
    commands = _named_in_docs(MODULE_COMMAND) | _named_in_docs(SCRIPT_COMMAND)
    assert commands, "the docs name no `python -m vit_hf.<command>`: the regular expression no longer matches them"
    failures = _help_failures(help_answers, commands)
    assert not failures, "commands named in the docs that do not answer --help:\n" + "\n".join(failures)


def test_every_command_module_and_benchmark_script_answers_help(help_answers):
    targets = {name: [name] for name in [*_command_modules(), *_benchmark_scripts()]}
    assert "vit_hf.finetune" in targets and "benchmarks/bench_loop.py" in targets
    failures = _help_failures(help_answers, targets)
    assert not failures, "commands that do not answer --help:\n" + "\n".join(failures)


def test_every_file_the_docs_name_exists():
    missing = [
        f"{path} (named at {', '.join(places)})"
        for path, places in sorted(_named_in_docs(REPO_PATH).items())
        if not (REPO / path).exists()
    ]
    assert not missing, "files named in the docs that do not exist:\n" + "\n".join(missing)


# ----------------------------------------------------------------------------------------------------------
# The import graph


def _import_targets(module: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The vit_hf modules MODULE imports anywhere (function bodies and TYPE_CHECKING blocks too), each with the line of
    its first import. A package stands for its __init__; `from package import name` means the submodule where NAME
    is one, else the package."""

    def deepest(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        found = []
        if isinstance(node, ast.Import):
            found = [deepest(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else deepest(base) for a in node.names]
        for target in found:
            if target is not None and target != module:
                targets[target] = min(targets.get(target, node.lineno), node.lineno)
    return targets


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every cycle a depth-first search meets (one per back edge), each as the modules in import order."""
    state, stack, cycles = {}, [], []

    def visit(module: str) -> None:
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, {})):
            if state.get(target) == "open":
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return cycles


def test_the_cycle_finder_finds_a_cycle_and_names_its_modules():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}, "c": {"a": 1, "b": 1}}) == []


def test_the_import_graph_resolves_submodules_relative_imports_and_imports_in_functions(tmp_path):
    source = (
        "import vit_hf.data.sources\nfrom . import recipe\ndef f():\n    from vit_hf.utils import errors, nothing\n"
    )
    path = tmp_path / "cmd.py"
    path.write_text(source)
    modules = {name: tmp_path for name in ("vit_hf", "vit_hf.data", "vit_hf.data.sources", "vit_hf.recipe")}
    modules |= {"vit_hf.utils": tmp_path, "vit_hf.utils.errors": tmp_path, "vit_hf.cmd": path}
    targets = _import_targets("vit_hf.cmd", path, modules)
    assert targets == {"vit_hf.data.sources": 1, "vit_hf.recipe": 2, "vit_hf.utils.errors": 4, "vit_hf.utils": 4}


def test_the_package_has_no_import_cycle():
    modules = _package_modules()
    graph = {module: _import_targets(module, path, modules) for module, path in modules.items()}
    assert graph["vit_hf.finetune"], "the import graph found no import in vit_hf.finetune"

    def edge(a: str, b: str) -> str:
        return f"{a} -> {b} ({modules[a].relative_to(REPO)}:{graph[a][b]})"

    cycles = [", ".join(edge(a, b) for a, b in zip(cycle, cycle[1:], strict=False)) for cycle in _cycles(graph)]
    assert not cycles, "import cycles in vit_hf:\n" + "\n".join(cycles)


def test_the_package_imports_nothing_from_benchmarks_or_tests():
    # With pytest's pythonpath, the modules of both folders are importable by their own names.
    outside = {"benchmarks", "tests"} | {path.stem for path in [*BENCHMARKS.glob("*.py"), *TESTS.glob("*.py")]}
    outside |= {path.name for path in TESTS.iterdir() if path.is_dir() and not path.name.startswith((".", "__"))}
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            offenders += [f"{path.relative_to(REPO)}:{node.lineno}: {name}" for name in names
                          if name.split(".")[0] in outside]  # fmt: skip
    assert not offenders, "vit_hf imports from benchmarks/ or tests/:\n" + "\n".join(offenders)


def test_no_code_in_the_package_mentions_the_shared_folder():
    shared = re.compile(r"\.\./shared|(?<![\w.-])shared/")
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted([*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.c")])
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if shared.search(line)
    ]
    assert not offenders, "vit_hf mentions ../shared (the tests' material, absent on a user's machine):\n" + "\n".join(
        offenders
    )


# ----------------------------------------------------------------------------------------------------------
# Sizes


def _functions(tree: ast.AST, prefix: str = ""):
    """(qualified name, node) of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node
            yield from _functions(node, f"{name}.")
        else:
            yield from _functions(node, prefix)


def test_no_module_is_over_450_lines():
    offenders = [
        f"{path.relative_to(REPO)}: {lines} lines"
        for path in sorted(PACKAGE.rglob("*.py"))
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not offenders, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(offenders)


def test_no_function_is_over_50_lines():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for name, node in _functions(ast.parse(path.read_text())):
            lines = node.end_lineno - node.lineno + 1
            if lines > MAX_FUNCTION_LINES and node.name not in LONG_FUNCTIONS_ALLOWED:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}: {lines} lines")
    assert not offenders, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(offenders)


def test_the_commands_are_thin_and_few():
    top = sorted(path for path in PACKAGE.glob("*.py") if path.name != "__init__.py")
    offenders = [
        f"{path.relative_to(REPO)}: a command of {lines} lines"
        for path in top
        if _is_command(ast.parse(text := path.read_text())) and (lines := len(text.splitlines())) > MAX_COMMAND_LINES
    ]
    if len(top) > MAX_TOP_LEVEL_MODULES:
        offenders.append(f"{len(top)} modules directly in vit_hf/: {', '.join(path.stem for path in top)}")
    assert not offenders, (
        f"commands over {MAX_COMMAND_LINES} lines, or over {MAX_TOP_LEVEL_MODULES} modules directly in vit_hf/:\n"
        + "\n".join(offenders)
    )


# ----------------------------------------------------------------------------------------------------------
# The shared material in CI

PROBE = """
from conftest import cifar10_dir  # noqa: F401 (the fixture under test)


def test_needs_the_shared_data(cifar10_dir):
    pass
"""


@pytest.mark.parametrize("ci, fails", [("true", True), ("1", True), (None, False)])
def test_a_missing_shared_folder_fails_in_ci_and_skips_elsewhere(tmp_path, ci, fails):
    (tmp_path / "test_probe.py").write_text(PROBE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the project's options (pytest-xdist workers)
    missing = tmp_path / "no_shared_here"
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    env |= {"VIT_HF_SHARED": str(missing), "PYTHONPATH": os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])}
    if ci is not None:
        env["CI"] = ci
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", "-c", str(tmp_path / "pytest.ini"),
         "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert str(missing / "data" / "cifar10") in output, output
    if fails:
        assert done.returncode == 1 and "1 error" in output and "VIT_HF_SHARED" in output, output
    else:
        assert done.returncode == 0 and "1 skipped" in output, output


@pytest.mark.parametrize(
    "value, ci",
    [("true", True), ("TRUE", True), ("True", True), ("1", True), ("false", False), ("0", False), ("", False)],
)
def test_the_ci_variable_is_read_as_ci_services_set_it(monkeypatch, value, ci):
    from launch import in_ci

    monkeypatch.setenv("CI", value)
    assert in_ci() is ci


def test_the_ci_script_declares_itself_ci_before_the_tests_run():
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert "export CI=true" in lines
    assert lines.index("export CI=true") < next(i for i, line in enumerate(lines) if "$test_command" in line)
