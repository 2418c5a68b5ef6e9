"""Security: nothing in the source tree unpickles or evaluates code (docs/reliability.md §6).

A static scan of every *.py under duquant_pack/, duquant_runtime/, benchmarks/ and tests/. It
parses each file (a file that does not parse fails the test) and walks the syntax tree, so
`model.eval()`, comments and prose in docstrings are not findings. String literals that parse as
Python (the helper programs that tests run with `python -c`) are scanned as code too. Forbidden:

- pickle-family modules (pickle, cPickle, _pickle, dill, cloudpickle, shelve): imported (also via
  `__import__` / `importlib.import_module`) or used (`pickle.loads`, ...);
- `torch.load(...)` without `weights_only=True` in the same call; `pandas.read_pickle`, `joblib.load`;
- `allow_pickle=` anything but the literal False, in any call;
- `np.load(...)` without an explicit `allow_pickle=False` in library code (duquant_pack/,
  duquant_runtime/; numpy's default is False, but the library states it);
- bare `eval(` / `exec(` calls (and `builtins.eval` / `builtins.exec`).

Tests that write hostile inputs (pickled files that must be refused) may need a forbidden call; each
such line is in ALLOWED as an exact (file, line) pair, only under tests/, and the allowlist is
itself checked: every entry must still exist and still be a finding, so it cannot rot or widen.
The scanner checks itself: each forbidden pattern in FORBIDDEN_SNIPPETS is a finding, each safe
look-alike in SAFE_SNIPPETS is not.

Path escapes out of a pack directory are tested where packs are read: test_reliability_packs.py
("layer path with ..", "absolute layer path", symlinks, HDF5 external links) and
test_format_pack.py::test_layer_paths_must_stay_in_layers_dir.
"""

from __future__ import annotations

import ast
import functools
import textwrap
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOTS = ("duquant_pack", "duquant_runtime", "benchmarks", "tests")
LIBRARY = ("duquant_pack/", "duquant_runtime/")
SELF = "tests/test_security.py"
# this file's test vectors (module-level assignments): data, not code
SELF_VECTORS = {"ALLOWED", "FORBIDDEN_SNIPPETS", "SAFE_SNIPPETS", "HELPER_LINE_SNIPPET", "VECTOR_SNIPPET"}

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve"}
UNPICKLING_CALLS = {"pandas.read_pickle", "joblib.load"}
TORCH_LOADS = {"torch.load", "torch.serialization.load"}
NUMPY_LOADS = {"numpy.load"}
EVALS = {"eval", "exec", "builtins.eval", "builtins.exec"}
DEFAULT_ALIASES = {"np": "numpy", "numpy": "numpy", "torch": "torch", "builtins": "builtins"}

# (file, stripped line): tests that write a pickled file to check that it is refused
ALLOWED = {
    ("tests/test_legacy.py",
     'np.save(open(bad, "wb"), np.array([{"a": 1}], dtype=object), allow_pickle=True)  # a .npy named .npz'),
}


# --- the scanner -------------------------------------------------------------------------------------

def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted module or object name, from every import in the tree."""
    names = dict(DEFAULT_ALIASES)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    names[a.asname] = a.name
                else:
                    root = a.name.split(".")[0]
                    names[root] = root
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """'np.load' -> 'numpy.load' (with the file's import aliases); None for anything not a name chain."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _is_pickle_module(name: str | None) -> bool:
    return bool(name) and name.split(".")[0] in PICKLE_MODULES


def _scan_tree(tree: ast.AST, rel: str, lines: list[str], line0: int, skip: set[int]) -> list[tuple]:
    """Findings (rel, line number, rule, stripped line) in `tree`, whose line 1 is file line line0 + 1.
    String constants whose id() is in `skip` are not scanned as code."""
    aliases = _aliases(tree)
    found = []

    def flag(node, rule):
        text = lines[node.lineno - 1].strip() if 0 < node.lineno <= len(lines) else ""
        found.append((rel, line0 + node.lineno, rule, text))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _is_pickle_module(a.name):
                    flag(node, f"imports {a.name}")
        elif isinstance(node, ast.ImportFrom):
            if _is_pickle_module(node.module):
                flag(node, f"imports from {node.module}")
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            name = _dotted(node, aliases)
            if _is_pickle_module(name) and not isinstance(node.value, ast.Attribute):  # once per chain
                flag(node, f"uses {name}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func, aliases)
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not _is_const(allow, False):
                flag(node, "allow_pickle= other than False")
            if name in TORCH_LOADS and not _is_const(_keyword(node, "weights_only"), True):
                flag(node, f"{name} without weights_only=True")
            if name in NUMPY_LOADS and rel.startswith(LIBRARY) and not _is_const(allow, False):
                flag(node, f"{name} without an explicit allow_pickle=False in library code")
            if name in UNPICKLING_CALLS or (name and name.endswith(".read_pickle")):
                flag(node, f"calls {name}")
            if name in EVALS:
                flag(node, f"calls {name}")
            if name in ("__import__", "importlib.import_module") and node.args and \
                    isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str) and \
                    _is_pickle_module(node.args[0].value):
                flag(node, f"imports {node.args[0].value}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            code = textwrap.dedent(node.value)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # invalid escapes in regexes parsed as code
                    inner = ast.parse(code)
            except (SyntaxError, ValueError):
                continue  # prose, a regex, a path: not code
            found += _scan_tree(inner, rel, code.splitlines(), line0 + node.lineno - 1, set())
    return found


def scan_source(source: str, rel: str) -> list[tuple]:
    """Findings of one file's source text; `rel` is its path from the repository root (posix)."""
    tree = ast.parse(source, filename=rel)  # a SyntaxError names the file
    skip = set()
    if rel == SELF:
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id in SELF_VECTORS
                                                    for t in node.targets):
                skip |= {id(n) for n in ast.walk(node.value)}
    return sorted(set(_scan_tree(tree, rel, source.splitlines(), 0, skip)))


def source_files() -> list[Path]:
    return sorted(p for root in ROOTS for p in (REPO / root).rglob("*.py") if "__pycache__" not in p.parts)


@functools.lru_cache(maxsize=1)
def scan_repo() -> tuple[tuple, ...]:
    """Findings of every file under ROOTS (scanned once per session)."""
    found = []
    for p in source_files():
        found += scan_source(p.read_text(encoding="utf-8"), p.relative_to(REPO).as_posix())
    return tuple(found)


def _allowed(finding: tuple) -> bool:
    rel, _, _, text = finding
    return rel.startswith("tests/") and (rel, text) in ALLOWED


# --- the scanner checks itself -------------------------------------------------------------------------

# name -> (file the snippet is scanned as, source, the rule that must fire)
FORBIDDEN_SNIPPETS = {
    "import pickle": ("tests/x.py", "import pickle\n", "imports pickle"),
    "import cPickle": ("tests/x.py", "import cPickle as p\n", "imports cPickle"),
    "from pickle import loads": ("tests/x.py", "from pickle import loads\n", "imports from pickle"),
    "import _pickle": ("tests/x.py", "import _pickle\n", "imports _pickle"),
    "import dill": ("tests/x.py", "import dill\n", "imports dill"),
    "__import__('pickle')": ("tests/x.py", "m = __import__('pickle')\n", "imports pickle"),
    "importlib.import_module('pickle')": ("tests/x.py", "import importlib\nm = importlib.import_module('pickle')\n",
                                          "imports pickle"),
    "pickle.loads without an import": ("benchmarks/x.py", "obj = pickle.loads(data)\n", "uses pickle.loads"),
    "torch.load without weights_only": ("tests/x.py", "import torch\nsd = torch.load(path)\n",
                                        "torch.load without weights_only=True"),
    "torch.load weights_only=False": ("tests/x.py", "import torch\nsd = torch.load(path, weights_only=False)\n",
                                      "torch.load without weights_only=True"),
    "torch.load weights_only from a variable": ("tests/x.py", "import torch\nsd = torch.load(path, weights_only=w)\n",
                                                "torch.load without weights_only=True"),
    "torch.load via from-import": ("tests/x.py", "from torch import load\nsd = load(path)\n",
                                   "torch.load without weights_only=True"),
    "torch.load via an alias": ("tests/x.py", "import torch as T\nsd = T.load(path)\n",
                                "torch.load without weights_only=True"),
    "torch.load, weights_only in another call": ("tests/x.py", "import torch\nf(torch.load(p), weights_only=True)\n",
                                                 "torch.load without weights_only=True"),
    "np.load allow_pickle=True": ("tests/x.py", "import numpy as np\nz = np.load(p, allow_pickle=True)\n",
                                  "allow_pickle= other than False"),
    "np.save allow_pickle=True": ("benchmarks/x.py", "import numpy as np\nnp.save(p, a, allow_pickle=True)\n",
                                  "allow_pickle= other than False"),
    "allow_pickle from a variable": ("tests/x.py", "import numpy\nz = numpy.load(p, allow_pickle=flag)\n",
                                     "allow_pickle= other than False"),
    "np.load without allow_pickle in duquant_pack": (
        "duquant_pack/x.py", "import numpy as np\nz = np.load(p)\n",
        "numpy.load without an explicit allow_pickle=False in library code"),
    "np.load without allow_pickle in duquant_runtime": (
        "duquant_runtime/x.py", "from numpy import load\nz = load(p)\n",
        "numpy.load without an explicit allow_pickle=False in library code"),
    "pandas.read_pickle": ("benchmarks/x.py", "import pandas as pd\ndf = pd.read_pickle(p)\n",
                           "calls pandas.read_pickle"),
    "joblib.load": ("benchmarks/x.py", "import joblib\nm = joblib.load(p)\n", "calls joblib.load"),
    "eval(": ("duquant_runtime/x.py", "x = eval(text)\n", "calls eval"),
    "exec(": ("tests/x.py", "exec(code, {})\n", "calls exec"),
    "builtins.eval": ("tests/x.py", "import builtins\nbuiltins.eval('1')\n", "calls builtins.eval"),
    "eval inside a method": ("duquant_pack/x.py", "class A:\n    def f(self, s):\n        return eval(s)\n",
                             "calls eval"),
    "pickle in a helper program run with python -c": (
        "tests/x.py", 'HELPER = r"""\nimport json, sys\nimport pickle\nprint(json.dumps(1))\n"""\n', "imports pickle"),
    "torch.load in an indented helper string": (
        "tests/x.py", 'def f():\n    code = """\n    import torch\n    torch.load(p)\n    """\n',
        "torch.load without weights_only=True"),
}

# name -> (file, source): look-alikes that are fine
SAFE_SNIPPETS = {
    "model.eval()": ("duquant_runtime/x.py", "model.eval()\nself.net.eval()\n"),
    "torch.load weights_only=True": ("tests/x.py",
                                     "import torch\nsd = torch.load(p, weights_only=True, map_location='cpu')\n"),
    "np.load allow_pickle=False in library code": ("duquant_pack/x.py",
                                                   "import numpy as np\nz = np.load(p, allow_pickle=False)\n"),
    "np.load default in tests": ("tests/x.py", "import numpy as np\nz = np.load(p)\n"),
    "the word pickle in a string": ("duquant_pack/x.py", 'ok = "pickle" in str(err).lower()\n'),
    "pickle in a comment and a docstring": ("duquant_pack/x.py",
                                            '"""Never unpickles: no pickle.loads, no eval(x) here."""\n# import pickle\n'),
    "a function named like pickle": ("tests/x.py", "def _pickle_payload(m):\n    return b'c'\n_pickle_payload(1)\n"),
    "re.compile and evaluate()": ("tests/x.py",
                                  "import re\nre.compile('x')\nmetrics.evaluate(x)\nexecutor.exec_batch()\n"),
    "np.savez of an object array (no keyword)": ("tests/x.py",
                                                 "import numpy as np\nnp.savez(p, meta=np.array([{}], dtype=object))\n"),
}


@pytest.mark.parametrize("case", list(FORBIDDEN_SNIPPETS))
def test_scanner_flags_each_forbidden_pattern(case):
    rel, source, rule = FORBIDDEN_SNIPPETS[case]
    found = scan_source(source, rel)
    assert rule in [f[2] for f in found], found
    assert not any(_allowed(f) for f in found)


@pytest.mark.parametrize("case", list(SAFE_SNIPPETS))
def test_scanner_passes_safe_look_alikes(case):
    rel, source = SAFE_SNIPPETS[case]
    assert scan_source(source, rel) == []


HELPER_LINE_SNIPPET = 'import json\nHELPER = r"""\nimport json\nimport pickle\n"""\n'
VECTOR_SNIPPET = 'FORBIDDEN_SNIPPETS = {"x": ("tests/x.py", "import pickle\\n", "imports pickle")}\n'


def test_scanner_reports_the_line_of_code_in_a_helper_string():
    """A finding inside a multi-line string names the file line it is on."""
    assert scan_source(HELPER_LINE_SNIPPET, "tests/x.py") == [("tests/x.py", 4, "imports pickle",
                                                              HELPER_LINE_SNIPPET.splitlines()[3])]


def test_own_test_vectors_are_only_skipped_in_this_file():
    """The exclusion of the test vectors is tied to this file: elsewhere the same assignment is a finding."""
    assert scan_source(VECTOR_SNIPPET, SELF) == []
    assert [f[2] for f in scan_source(VECTOR_SNIPPET, "tests/other.py")] == ["imports pickle"]


# --- the source tree -------------------------------------------------------------------------------------

def test_every_root_is_scanned():
    files = {p.relative_to(REPO).as_posix() for p in source_files()}
    for root in ROOTS:
        assert any(f.startswith(root + "/") for f in files), root
    assert SELF in files and "duquant_pack/legacy.py" in files and "duquant_runtime/__init__.py" in files


def test_source_tree_never_unpickles_or_evaluates():
    bad = [f for f in scan_repo() if not _allowed(f)]
    assert bad == [], "\n".join(f"{rel}:{line}: {rule}: {text}" for rel, line, rule, text in bad)


def test_allowlist_entries_exist_are_findings_and_only_in_tests():
    """Each allowed line is in a test, still in its file, and still a finding (else remove it)."""
    found = {(rel, text) for rel, _, _, text in scan_repo()}
    for rel, text in ALLOWED:
        assert rel.startswith("tests/") and rel != SELF, rel
        path = REPO / rel
        assert path.is_file(), rel
        assert text in [line.strip() for line in path.read_text(encoding="utf-8").splitlines()], (rel, text)
        assert (rel, text) in found, f"{rel}: allowed line is no longer a finding; remove it from ALLOWED: {text}"
