"""The README's commands and paths stay true: every command line it shows parses with the real parser, every
module it runs exists and runs as a script, every make target and every file it names exists.

A renamed option, a split module or a moved file breaks the user's first copy-and-paste; these tests break first.
"""
import argparse
import contextlib
import importlib.util
import io
import re
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
#: Files the README names that live outside this repository, with where they are.
ELSEWHERE = {
    "CVPR25_iter_eval.py": "the CVPR 2025 challenge's evaluation script",
    "scripts/check_description_files.py": "the Slicer Extensions Index's check",
}


def _code_lines():
    """Each command line of the README's code blocks, continuation lines joined, comments removed."""
    lines = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", README, re.S):
        pending = ""
        for line in block.split("\n"):
            line = pending + line
            if line.rstrip().endswith("\\"):
                pending = line.rstrip()[:-1] + " "
                continue
            pending = ""
            lines.append(line.split(" #")[0].strip())
    return lines


def _commands(prefix):
    """The arguments after ``prefix`` of every code-block line that starts with it."""
    return [shlex.split(line[len(prefix):]) for line in _code_lines() if line.startswith(prefix)]


def _parses(parser, argv):
    """Whether ``parser`` accepts ``argv`` (``--help`` counts when it exits 0); the parser's message otherwise."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
            return parser.parse_args(argv)
    except SystemExit as exc:
        if exc.code == 0:
            return None
        pytest.fail(f"README command {' '.join(argv)!r} does not parse: {stderr.getvalue().strip()}")


def test_the_readme_shows_command_lines_to_check():
    """The extraction finds the commands: a README rewritten into another form would silently check nothing."""
    assert len(_commands("python -m FastSAM3DLib ")) >= 15
    assert len(_commands("python -m FastSAM3DLib.server ")) >= 2


def test_every_command_line_parses_with_the_real_parser():
    from FastSAM3DLib.cli import build_parser, parse_point

    for argv in _commands("python -m FastSAM3DLib "):
        args = _parses(build_parser(), argv)
        for point in getattr(args, "point", None) or []:
            parse_point(point)  # what segment does first with each --point


def test_every_server_command_line_parses_with_the_servers_parser():
    from FastSAM3DLib.server.command import add_arguments

    for argv in _commands("python -m FastSAM3DLib.server "):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        _parses(parser, argv)


def test_every_module_the_readme_runs_exists_and_runs_as_a_script():
    modules = set(re.findall(r"python3? -m (FastSAM3DLib[\w.]*)", README))
    assert {"FastSAM3DLib", "FastSAM3DLib.server", "FastSAM3DLib.benchmarks.report"} <= modules
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, f"README runs 'python -m {name}', which does not exist"
        if spec.submodule_search_locations:  # a package runs its __main__.py
            assert importlib.util.find_spec(name + ".__main__") is not None, f"{name} has no __main__.py"
        else:
            source = Path(spec.origin).read_text(encoding="utf-8")
            assert 'if __name__ == "__main__"' in source, f"python -m {name} would do nothing"


def test_every_make_target_the_readme_names_exists():
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M))
    code = re.findall(r"`([^`\n]+)`", README) + _code_lines()  # inline code and code blocks, not prose
    named = {m for text in code for m in re.findall(r"(?:^|[;&|(]\s*)make ([a-z][\w-]*)", text)}
    assert {"demo", "test", "bench", "gpu-check"} <= named
    assert named <= targets, f"the README names make targets the Makefile lacks: {sorted(named - targets)}"


def _repository_files():
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    return [name for name in listed if name]


def test_every_file_the_readme_names_exists():
    """Paths (``Testing/...``, ``FastSAM3DLib/...``) exist; a bare ``name.py`` or ``scene/writing.py`` is some
    file's name; a glob (``precision-*.json``) matches one. A template (``bench-<device>-<date>.json``) names
    what a command writes, so it need not exist."""
    files = _repository_files()
    missing = []
    for match in re.finditer(r"(?<![\w/.<-])((?:[\w.-]+/)*[\w.-]*[\w-])(?=([<*]?))", README):
        name, pattern = match.groups()
        rooted = name.split("/")[0] in {"FastSAM3DLib", "Testing", "FastSAM3D", "Resources"}
        if not (rooted or re.search(r"\w\.py$", name)) or name in ELSEWHERE or pattern == "<":
            continue  # <...>: the name a command will write, not a file that must exist
        if pattern == "*":
            found = any(f.startswith(name) for f in files)
        elif rooted:
            found = (ROOT / name).exists()
        else:
            found = any(f == name or f.endswith("/" + name) for f in files)
        if not found:
            missing.append(name)
    assert not missing, f"the README names files that do not exist: {sorted(set(missing))}"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README, re.S)


def _resolve_calls(source):
    """(call text, the library callable it calls, its arguments) for each call of a library name in ``source``:
    names imported from FastSAM3DLib, their attributes (``Volume.from_file``), and methods of variables assigned
    from a library class (``session = InteractiveSession(...)``; ``session.add_click(...)``)."""
    import ast

    tree = ast.parse(source)
    names, instances, calls = {}, {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("FastSAM3DLib"):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"README imports {alias.name} from {node.module}: not there"
                names[alias.asname or alias.name] = getattr(module, alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                isinstance(node.value.func, ast.Name) and isinstance(names.get(node.value.func.id), type):
            instances.update({target.id: names[node.value.func.id] for target in node.targets
                              if isinstance(target, ast.Name)})
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, bound = node.func, None
        if isinstance(func, ast.Name) and func.id in names:
            target = names[func.id]
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and \
                (func.value.id in names or func.value.id in instances):
            owner = names.get(func.value.id) or instances[func.value.id]
            assert hasattr(owner, func.attr), f"README calls {ast.unparse(func)}, which {owner.__name__} lacks"
            target, bound = getattr(owner, func.attr), func.value.id in instances
        else:
            continue
        calls.append((ast.unparse(node), target, bound, len(node.args), [k.arg for k in node.keywords]))
    return calls


def test_every_library_call_in_the_readmes_python_matches_its_signature():
    """Each README snippet imports names that exist and calls them with arguments their signatures take."""
    import inspect

    pytest.importorskip("slicer", reason="the console snippets import FastSAM3DLib.scene, which needs slicer-core")
    checked = 0
    for source in _python_blocks():
        for text, target, bound, positional, keywords in _resolve_calls(source):
            signature = inspect.signature(target)
            arguments = [None] * (positional + (1 if bound else 0))
            try:
                signature.bind(*arguments, **dict.fromkeys(keywords))
            except TypeError as exc:
                pytest.fail(f"README's {text} does not match {target.__qualname__}{signature}: {exc}")
            checked += 1
    assert checked >= 10, "the README's Python examples were not found"
