"""The module map as an import graph: which rlmt module may pull in which, and no lazy imports hiding a cycle.

DAG at the bottom of the library (an arrow: imports at module level):
    rlmt.hub     <- rlmt.chat <- rlmt.data ...
    rlmt.hub, rlmt.chunked  <- rlmt.model <- rlmt.logprobs ...
rlmt.chat knows the hub's names but not the decoder; the decoder (rlmt.model) knows neither the prompt
templates nor the log-prob alignment that runs it.
"""

import ast
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "rlmt")
MODULES = sorted("rlmt." + f[:-3] for f in os.listdir(PKG) if f.endswith(".py") and f != "__init__.py")
NO_LAZY_RLMT = ("model", "chat", "logprobs", "hub", "chunked")  # no `from rlmt …` inside a function here

# One fresh interpreter imports every module with no other rlmt module loaded before it (the third-party
# packages stay loaded, which keeps this fast) and reports the rlmt modules each one pulled in. A module
# whose top-level imports close a cycle fails here when imported first.
_PROBE = r"""
import importlib, json, sys, traceback
import torch, torch.nn.functional, torch.distributed  # loaded once; only rlmt modules are forgotten
out = {}
for name in sys.argv[1:]:
    for m in [m for m in sys.modules if m == "rlmt" or m.startswith("rlmt.")]:
        del sys.modules[m]
    try:
        importlib.import_module(name)
        out[name] = sorted(m for m in sys.modules if m.startswith("rlmt."))
    except Exception:
        out[name] = "error: " + traceback.format_exc(limit=3)
print(json.dumps(out))
"""


def _run(code, *args):
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def pulled():
    return _run(_PROBE, *MODULES)


def test_every_module_imports_on_its_own(pulled):
    errors = {m: v for m, v in pulled.items() if isinstance(v, str)}
    assert not errors, errors


def test_the_decoder_and_the_templates_stay_apart(pulled):
    assert set(pulled["rlmt.hub"]) == {"rlmt.hub"}
    assert set(pulled["rlmt.chunked"]) == {"rlmt.chunked"}
    assert set(pulled["rlmt.chat"]) == {"rlmt.chat", "rlmt.hub"}  # not rlmt.model
    assert set(pulled["rlmt.model"]) == {"rlmt.model", "rlmt.hub", "rlmt.chunked"}  # not logprobs, data, chat
    assert "rlmt.model" in pulled["rlmt.logprobs"]


def test_chat_and_hub_import_without_torch():
    """Tokenizer-only tools (judging, exporting) read templates and resolve names without loading torch."""
    code = "import json, sys, rlmt.chat, rlmt.hub; print(json.dumps([m for m in ('torch', 'rlmt.model') " \
           "if m in sys.modules]))"
    assert _run(code) == []


def _rlmt_imports(node):
    """Module names of the `import rlmt…` / `from rlmt… import …` / relative imports directly under node."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "rlmt"]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            return ["." * node.level + (node.module or "")]
        if (node.module or "").split(".")[0] == "rlmt":
            return [node.module + "." + a.name if node.module == "rlmt" else node.module for a in node.names]
    return []


@pytest.mark.parametrize("name", NO_LAZY_RLMT)
def test_no_lazy_rlmt_import_inside_a_function(name):
    tree = ast.parse(open(os.path.join(PKG, name + ".py")).read())
    lazy = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            lazy += [(fn.lineno, m) for node in ast.walk(fn) for m in _rlmt_imports(node)]
    assert not lazy, f"rlmt/{name}.py imports rlmt modules inside functions: {lazy}"


def test_module_level_imports_form_a_dag():
    """The imports each module makes when it is loaded (not the lazy ones inside functions) have no cycle."""
    graph = {}
    for mod in MODULES:
        tree = ast.parse(open(os.path.join(PKG, mod[5:] + ".py")).read())
        deps, todo = set(), list(tree.body)
        while todo:  # module level, including under `try:` / `if …:`, but not inside defs or classes
            node = todo.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            deps.update(m for m in _rlmt_imports(node) if m in MODULES)
            todo.extend(ast.iter_child_nodes(node))
        graph[mod] = deps
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in MODULES:
        visit(m, [])
