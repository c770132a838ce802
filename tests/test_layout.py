"""The layout of docs/layout.md: the project's modules import one another without a cycle, nothing imports
enjoy.py, the training scripts hold their algorithm and leave the run infrastructure to helm_utils/."""

import ast
from pathlib import Path

from conftest import ROOT, SCRIPTS


def project_modules():
    """{module name: path} of the project's own Python files (tests aside)."""
    paths = [*ROOT.glob("*.py"), *ROOT.glob("helm_utils/*.py"), *ROOT.glob("benchmark/**/*.py")]
    modules = {}
    for path in paths:
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports(path, modules):
    """The project's modules that `path` imports, at the top or inside a function (a lazy import is one too)."""
    found = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name in modules}


def cycles(graph):
    """Every cycle of a directed graph {node: successors}, each as the list of its nodes (depth-first search)."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def import_graph():
    modules = project_modules()
    return {name: imports(path, modules) - {name} for name, path in modules.items()}


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    graph = import_graph()
    assert {"shelm_ppo", "helm_utils.runs", "helm_utils.evaluation", "enjoy"} <= set(graph)
    assert cycles(graph) == []


def test_nothing_imports_enjoy():
    graph = import_graph()
    assert [name for name, deps in graph.items() if "enjoy" in deps] == []


def test_the_scripts_leave_the_run_infrastructure_to_the_package():
    # what runs a run (checkpoint reading and validation, run directories, signals, wandb) is not in a script
    for script in SCRIPTS:
        text = (ROOT / script).read_text()
        for name in ["torch.load", "signal.signal", "wandb.init", "SummaryWriter(", "fcntl", "def check_checkpoint"]:
            assert name not in text, f"{script} has {name}: it belongs in helm_utils/"
        assert "runs.Run(" in text and "runs.parse(" in text
