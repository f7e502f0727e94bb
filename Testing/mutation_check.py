"""Mutation check: do the tests notice when a file you changed gets a small bug?

Copies the repository to a temporary folder, makes one-line changes ("mutants") to FILE there, one at a time,
runs the given pytest selection against each, and reports which mutants the tests kill (a test fails) and
which survive (every test passes: a bug the tests would let through). Your working tree is never modified.

Mutations: comparison operators flipped (``<`` <-> ``<=``, ``==`` <-> ``!=``, ``in`` <-> ``not in``, ...),
integer constants +1 / -1, ``True`` <-> ``False``, ``and`` <-> ``or``, ``not x`` -> ``x``, ``+`` <-> ``-``,
``os.replace``/``os.rename`` -> a copy in place, and a simple statement dropped (replaced by ``pass``).
A line ending in ``# pragma: no mutate`` is left alone.

Usage (from the repository root, with the project's venv)::

    .venv/bin/python Testing/mutation_check.py FastSAM3DLib/files/atomic.py -- Testing/test_files.py
    .venv/bin/python Testing/mutation_check.py FastSAM3DLib/session.py --changed --max-mutants 20 \\
        -- Testing/test_session.py -k "border or coming_back"

Everything after ``--`` goes to pytest (paths relative to the repository root). The run is bounded: at most
``--max-mutants`` mutants (a seeded sample when there are more) and ``--timeout`` seconds each (default: 10 x
the unmutated run, at least 60 s; a mutant that runs out of time is run once more with three times as long,
in case the machine was busy, and then counts as killed, as a hang is noticed). Exit status 0 when no mutant
survived, 1 when some did, 2 when the unmutated tests do not pass. Standard library only (plus pytest).
"""
from __future__ import annotations

import argparse
import ast
import difflib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Set, Tuple

REPO = Path(__file__).resolve().parents[1]
IGNORED = (".git", ".venv", "venv", "__pycache__", ".pytest_cache", "*.egg-info", "build", "out", ".mypy_cache")
SWAPS = {"<": "<=", "<=": "<", ">": ">=", ">=": ">", "==": "!=", "!=": "==", "is": "is not", "is not": "is",
         "in": "not in", "not in": "in"}
OP_TEXT = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!=", ast.Is: "is",
           ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}


@dataclass
class Mutant:
    """One changed line: ``line`` (1-based) of the file becomes ``text``."""

    line: int
    what: str
    text: str


def mutants(source: str) -> List[Mutant]:
    """Every one-line mutant of ``source`` that still compiles, in line order."""
    lines = source.splitlines(keepends=True)
    raw = [line.encode("utf-8") for line in lines]  # ast columns count UTF-8 bytes
    found: List[Mutant] = []
    tree = ast.parse(source)
    docstrings = _docstring_lines(tree)
    in_fstrings = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr)
                   for inner in ast.walk(node)}  # their column offsets are unreliable before Python 3.12

    def edit(node_line: int, start: int, end: int, new: str, what: str) -> None:
        line = raw[node_line - 1]
        if line.rstrip().endswith(b"# pragma: no mutate"):
            return
        text = (line[:start] + new.encode("utf-8") + line[end:]).decode("utf-8")
        found.append(Mutant(node_line, what, text))

    for node in ast.walk(tree):
        if id(node) in in_fstrings:
            continue
        single = getattr(node, "lineno", None) is not None and node.lineno == getattr(node, "end_lineno", None)
        if isinstance(node, ast.Compare):
            for operand, op, right in zip([node.left] + node.comparators, node.ops, node.comparators):
                if operand.end_lineno != right.lineno or type(op) not in OP_TEXT:
                    continue
                gap = raw[right.lineno - 1][operand.end_col_offset:right.col_offset].decode("utf-8")
                old = OP_TEXT[type(op)]
                pattern = r"\bis\s+not\b|\bnot\s+in\b|\bis\b|\bin\b" if old[0].isalpha() else re.escape(old)
                match = re.search(pattern, gap)
                if match:
                    start = operand.end_col_offset + len(gap[:match.start()].encode("utf-8"))
                    edit(right.lineno, start, start + len(match.group(0).encode("utf-8")), SWAPS[old],
                         f"{old} -> {SWAPS[old]}")
        elif isinstance(node, ast.Constant) and single and node.lineno not in docstrings \
                and _literal(raw[node.lineno - 1][node.col_offset:node.end_col_offset]) == node.value:
            if isinstance(node.value, bool):
                edit(node.lineno, node.col_offset, node.end_col_offset, str(not node.value),
                     f"{node.value} -> {not node.value}")
            elif isinstance(node.value, int):
                written = raw[node.lineno - 1][node.col_offset:node.end_col_offset].decode("utf-8")
                for delta in (1, -1):
                    value = node.value + delta
                    text = {"0o": oct, "0x": hex, "0b": bin}.get(written[:2].lower(), str)(value)
                    edit(node.lineno, node.col_offset, node.end_col_offset, text, f"{written} -> {text}")
        elif isinstance(node, ast.BoolOp) and single:
            old, new = ("and", "or") if isinstance(node.op, ast.And) else ("or", "and")
            for left, right in zip(node.values, node.values[1:]):
                gap = raw[node.lineno - 1][left.end_col_offset:right.col_offset].decode("utf-8")
                match = re.search(rf"\b{old}\b", gap)
                if match:
                    start = left.end_col_offset + len(gap[:match.start()].encode("utf-8"))
                    edit(node.lineno, start, start + len(old), new, f"{old} -> {new}")
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not) and single:
            match = re.match(rb"not\s*", raw[node.lineno - 1][node.col_offset:])
            if match:
                edit(node.lineno, node.col_offset, node.col_offset + match.end(), "", "not x -> x")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)) and single:
            old, new = ("+", "-") if isinstance(node.op, ast.Add) else ("-", "+")
            gap = raw[node.lineno - 1][node.left.end_col_offset:node.right.col_offset].decode("utf-8")
            index = gap.find(old)
            if index >= 0:
                start = node.left.end_col_offset + len(gap[:index].encode("utf-8"))
                edit(node.lineno, start, start + 1, new, f"{old} -> {new}")
        elif isinstance(node, ast.Call) and single and ast.unparse(node.func) in ("os.replace", "os.rename"):
            edit(node.lineno, node.func.col_offset, node.func.end_col_offset, "__import__('shutil').copyfile",
                 f"{ast.unparse(node.func)} -> shutil.copyfile (in place)")
        if isinstance(node, (ast.Expr, ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Return, ast.Raise,
                             ast.Delete, ast.Assert, ast.Break, ast.Continue)) and single \
                and node.lineno not in docstrings:
            line = raw[node.lineno - 1]
            rest = line[node.end_col_offset:].strip()
            if line[:node.col_offset].strip() == b"" and (not rest or rest.startswith(b"#")):
                edit(node.lineno, node.col_offset, node.end_col_offset, "pass", "statement dropped")
    result = []
    for mutant in sorted(found, key=lambda m: (m.line, m.what)):
        candidate = lines[:mutant.line - 1] + [mutant.text] + lines[mutant.line:]
        try:
            compile("".join(candidate), "<mutant>", "exec")
        except SyntaxError:
            continue
        result.append(mutant)
    return result


def _literal(text: bytes):
    """The value of a literal's source text (None when it is not one)."""
    try:
        return ast.literal_eval(text.decode("utf-8"))
    except (ValueError, SyntaxError, UnicodeDecodeError):
        return None


def _docstring_lines(tree: ast.AST) -> Set[int]:
    """Line numbers of docstrings (never mutated)."""
    lines: Set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def parse_lines(spec: str) -> Set[int]:
    """``"10-40,55"`` -> {10, ..., 40, 55}."""
    chosen: Set[int] = set()
    for part in filter(None, spec.split(",")):
        first, _, last = part.partition("-")
        chosen.update(range(int(first), int(last or first) + 1))
    return chosen


def function_lines(source: str, name: str) -> Set[int]:
    """The lines of every function or method called ``name`` in ``source`` (its ``def`` to its last line);
    ValueError when there is none."""
    import ast

    chosen: Set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            chosen.update(range(node.lineno, node.end_lineno + 1))
    if not chosen:
        raise ValueError(f"no function named {name!r}")
    return chosen


def changed_lines(path: Path) -> Set[int]:
    """Lines of ``path`` added or changed since the last commit (``git diff HEAD``); all lines if untracked."""
    relative = path.relative_to(REPO)
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", str(relative)], cwd=REPO,
                             capture_output=True).returncode == 0
    if not tracked:
        return set(range(1, len(path.read_text(encoding="utf-8").splitlines()) + 1))
    diff = subprocess.run(["git", "diff", "-U0", "HEAD", "--", str(relative)], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout
    chosen: Set[int] = set()
    for start, count in re.findall(r"^@@ -\S+ \+(\d+)(?:,(\d+))? @@", diff, flags=re.M):
        chosen.update(range(int(start), int(start) + int(count or 1)))
    return chosen


def run_tests(copy: Path, pytest_args: List[str], timeout: Optional[float]) -> Tuple[str, float, str]:
    """Run pytest in ``copy``; returns (outcome, seconds, output tail); outcome passed/failed/timeout/error."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(copy), env.get("PYTHONPATH")]))
    env.setdefault("FASTSAM3D_SHARED", str(REPO.parent / "shared"))  # the copy has no ../shared beside it
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *pytest_args]
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # pytest and any process its tests started
        output, _ = process.communicate()
        return "timeout", time.monotonic() - start, output[-2000:]
    outcome = {0: "passed", 1: "failed", 2: "failed", 3: "failed"}.get(process.returncode, "error")
    return outcome, time.monotonic() - start, output[-2000:]


def copy_repository() -> Path:
    """A copy of the working tree (no .git, no venv, no caches) in a new temporary folder."""
    target = Path(tempfile.mkdtemp(prefix="mutation-check-")) / REPO.name
    shutil.copytree(REPO, target, ignore=shutil.ignore_patterns(*IGNORED), symlinks=True)
    return target


def imported_from(copy: Path, relative: Path) -> Optional[str]:
    """Where the copy's Python imports the mutated module from (None when it is not an importable module)."""
    parts = relative.with_suffix("").parts
    if not all((copy.joinpath(*parts[:i]) / "__init__.py").exists() for i in range(1, len(parts))):
        return None
    module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(copy), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", f"import {module} as m; print(m.__file__)"], cwd=copy, env=env,
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s FILE [options] -- PYTEST_ARGS...")
    parser.add_argument("file", help="the file to mutate, e.g. FastSAM3DLib/files/atomic.py")
    parser.add_argument("--lines", help="only these lines, e.g. 10-40,55")
    parser.add_argument("--function", help="only the lines of this function or method, e.g. _create_temporary")
    parser.add_argument("--changed", action="store_true", help="only lines changed since the last commit")
    parser.add_argument("--max-mutants", type=int, default=40, help="at most this many (default 40)")
    parser.add_argument("--timeout", type=float,
                        help="seconds per mutant (default 10 x the unmutated run, >= 60; retried once with 3 x)")
    parser.add_argument("--seed", type=int, default=0, help="for the sample when there are more mutants")
    parser.add_argument("--list", action="store_true", help="only list the mutants")
    args = parser.parse_args(own)
    if not pytest_args and not args.list:
        parser.error("give the pytest selection after --, e.g. -- Testing/test_files.py")

    path = Path(args.file).resolve()
    relative = path.relative_to(REPO)
    source = path.read_text(encoding="utf-8")
    candidates = mutants(source)
    if args.lines or args.changed or args.function:
        wanted = (parse_lines(args.lines) if args.lines else set()) | (changed_lines(path) if args.changed else set())
        if args.function:
            try:
                wanted |= function_lines(source, args.function)
            except ValueError as exc:
                parser.error(f"{relative}: {exc}")
        candidates = [m for m in candidates if m.line in wanted]
    total = len(candidates)
    if total > args.max_mutants:
        candidates = sorted(random.Random(args.seed).sample(candidates, args.max_mutants),
                            key=lambda m: (m.line, m.what))
    print(f"{relative}: {total} mutants, running {len(candidates)}")
    if args.list:
        for m in candidates:
            print(f"  line {m.line}: {m.what}: {m.text.strip()}")
        return 0

    copy = copy_repository()
    target = copy / relative
    try:
        where = imported_from(copy, relative)
        if where is not None and Path(where).resolve() != target.resolve():
            print(f"the tests would import {where}, not the copy {target}: check PYTHONPATH / the install")
            return 2
        outcome, seconds, output = run_tests(copy, pytest_args, None)
        if outcome != "passed":
            print(f"the unmutated tests do not pass ({outcome}); fix them first:\n{output}")
            return 2
        timeout = args.timeout or max(60.0, 10 * seconds)
        print(f"unmutated run: passed in {seconds:.1f} s ({where or 'not an importable module'}); "
              f"timeout {timeout:.0f} s per mutant")
        lines = source.splitlines(keepends=True)
        results = []
        for number, m in enumerate(candidates, 1):
            target.write_text("".join(lines[:m.line - 1] + [m.text] + lines[m.line:]), encoding="utf-8")
            outcome, seconds, _ = run_tests(copy, pytest_args, timeout)
            if outcome == "timeout":  # a busy machine, or a real hang? once more with three times the time
                outcome, more, _ = run_tests(copy, pytest_args, 3 * timeout)
                seconds += more
            verdict = {"failed": "killed", "timeout": "killed (timeout)", "passed": "SURVIVED"}.get(outcome, outcome)
            print(f"[{number}/{len(candidates)}] line {m.line}: {m.what}: {verdict} ({seconds:.1f} s)", flush=True)
            results.append((m, verdict))
        target.write_text(source, encoding="utf-8")
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)

    survivors = [m for m, verdict in results if verdict == "SURVIVED"]
    killed = sum(verdict.startswith("killed") for _, verdict in results)
    errors = len(results) - killed - len(survivors)
    print(f"\n{killed} killed, {len(survivors)} survived" + (f", {errors} errors" if errors else "")
          + f" of {len(results)} ({100 * killed / max(1, len(results)):.0f} % killed)")
    for m in survivors:
        original = source.splitlines(keepends=True)
        mutated = original[:m.line - 1] + [m.text] + original[m.line:]
        print(f"\nsurvived: line {m.line}: {m.what}")
        sys.stdout.writelines(difflib.unified_diff(original, mutated, f"a/{relative}", f"b/{relative}", n=1))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
