"""The engine stays readable: short functions, a training step of few arguments.

Limits: 60 lines a function in `stoptool/train/`, 80 anywhere in `stoptool/`, and at most 8
parameters for any function of `stoptool/train/` (the step itself takes three).
"""

import ast
from pathlib import Path

import stoptool

ROOT = Path(stoptool.__file__).parent


def functions(source: str) -> list[tuple[str, int, int]]:
    """(name, lines, parameters) of every function and method in `source` (self/cls not counted)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
            n = len(params) - (1 if params and params[0].arg in ("self", "cls") else 0)
            out.append((node.name, node.end_lineno - node.lineno + 1, n))
    return out


def _each(folder: Path):
    for path in sorted(folder.rglob("*.py")):
        for name, lines, params in functions(path.read_text()):
            yield f"{path.relative_to(ROOT.parent)}:{name}", lines, params


def test_the_measure_counts_lines_and_parameters():
    src = "class A:\n    def f(self, a, b=1, *c, d, **e):\n        x = 1\n        return x\n"
    assert functions(src) == [("f", 3, 5)]


def test_no_function_is_longer_than_80_lines_nor_60_in_the_engine():
    too_long = [(where, n) for where, n, _ in _each(ROOT) if n > 80]
    too_long += [(where, n) for where, n, _ in _each(ROOT / "train") if n > 60]
    assert not too_long, too_long


def test_engine_functions_take_at_most_8_parameters():
    many = [(where, p) for where, _, p in _each(ROOT / "train") if p > 8]
    assert not many, many
    steps = {where.rsplit(":", 1)[1]: p for where, _, p in _each(ROOT / "train")}
    assert steps["train_step"] == 3
