"""The import rules of the five packages, read from the source: the allowed edges between packages,
no cycle, and no private name imported from another module.

Function-level imports hide a cycle (or a forbidden edge) from the interpreter — it works until
someone hoists the import — so the graph is read from the source: every `import`/`from … import`
anywhere in a module. An import of a package's name that is a submodule counts as an import of that
submodule.

The rules (the design card's): `schemas` <- `annotate` <- `train` <- `evaluate`, one way;
`datacards` is used by publishing only (annotate's `publish/` and its commands) and itself uses
nothing but `schemas`; `evaluate` sees `train` only through its policy contract,
`refinevla.train.policy`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "schemas": "refinevla.schemas",
    "annotate": "refinevla.annotate",
    "datacards": "refinevla.datacards",
    "train": "refinevla.train",
    "evaluate": "refinevla.evaluate",
}
# which packages each package may import (besides itself)
ALLOWED = {
    "refinevla.schemas": set(),
    "refinevla.datacards": {"refinevla.schemas"},
    "refinevla.annotate": {"refinevla.schemas", "refinevla.datacards"},
    "refinevla.train": {"refinevla.schemas", "refinevla.annotate"},
    "refinevla.evaluate": {"refinevla.schemas", "refinevla.annotate", "refinevla.train"},
}
PUBLISHING = ("refinevla.annotate.publish", "refinevla.annotate.commands")  # may import datacards
POLICY_CONTRACT = "refinevla.train.policy"  # all that evaluate may import of train


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGES.items():
        for f in (ROOT / folder).rglob("*.py"):
            if "sample" in f.relative_to(ROOT).parts:
                continue
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = f
    return out


def _imports(modules: dict[str, Path]) -> dict[str, list[tuple[str, str]]]:
    """module -> [(imported module, imported name or "")] for every import of one of ours."""
    found: dict[str, list[tuple[str, str]]] = {m: [] for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[tuple[str, str]] = []
            if isinstance(node, ast.Import):
                targets = [(a.name, "") for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base]) if base else ".".join(anchor)
                targets = [
                    (f"{base}.{a.name}", "") if f"{base}.{a.name}" in modules else (base, a.name) for a in node.names
                ]
            for target, imported in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found[name].append((target, imported))
    return found


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {m: {t for t, _ in edges} for m, edges in _imports(modules).items()}


def _package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                found.append([*stack[stack.index(n) :], n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_the_reader_sees_the_imports_a_cycle_would_be_made_of():
    graph = _graph(_modules())
    assert "refinevla.annotate.part" in graph["refinevla.annotate.parallel"]
    assert "refinevla.annotate.sources.remote" in graph["refinevla.annotate.sources.rlds"]
    assert "refinevla.train.policy" in graph["refinevla.evaluate.policy"]  # a lazy, function-level import
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_module_imports_itself_back_through_others():
    cycles = _cycles(_graph(_modules()))
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_packages_import_only_down_the_chain():
    wrong = []
    for module, targets in _graph(_modules()).items():
        for target in targets:
            src, dst = _package(module), _package(target)
            if src != dst and dst not in ALLOWED[src]:
                wrong.append(f"{module} -> {target}")
    assert wrong == [], "\n".join(wrong)


def test_datacards_serve_publishing_only():
    users = {m for m, ts in _graph(_modules()).items() for t in ts if _package(t) == "refinevla.datacards"}
    outside = sorted(m for m in users if _package(m) != "refinevla.datacards" and not m.startswith(PUBLISHING))
    assert users and outside == []


def test_evaluate_sees_train_only_through_the_policy_contract():
    graph = _graph(_modules())
    seen = sorted({t for m, ts in graph.items() if m.startswith("refinevla.evaluate") for t in ts})
    of_train = [t for t in seen if _package(t) == "refinevla.train"]
    assert of_train == [POLICY_CONTRACT]


def test_no_private_name_leaves_its_module():
    leaks = [
        f"{module} imports {name} from {target}"
        for module, edges in _imports(_modules()).items()
        for target, name in edges
        if name.startswith("_") and not name.startswith("__")
    ]
    assert leaks == [], "\n".join(leaks)
