"""The package's layout, checked from its source: imports point one way, every module says what it holds, and each
small concept (padding id, special tokens, positive counts, finite numbers, JSON digests) has one home."""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "saealign"
# every module of the package and its sub-packages, by dotted name under saealign ("grid", "experiments.paper")
MODULES = {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in sorted(PACKAGE.rglob("*.py"))
           if p.stem not in ("__init__", "_modidx")}


def imports_of(name: str, *, top_level_only: bool) -> set[str]:
    "The saealign modules module `name` imports (relative or absolute), at module level or anywhere."
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = name.split(".")[:-1]
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative to the module's package, one level up per extra dot
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            elif node.module == "saealign" or (node.module or "").startswith("saealign."):
                base = node.module.removeprefix("saealign").lstrip(".")
            else:
                continue
            # `from .grid import run_grid` names a module; `from . import grid` or `from .experiments import paper` its parts
            found |= {base} | {f"{base}.{a.name}".lstrip(".") for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("saealign.") for a in node.names if a.name.startswith("saealign.")}
    return found & set(MODULES)


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    "One import cycle of `graph` (module -> the modules it imports), or None."
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle_built_by_hand():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("top_level_only", [True, False])
def test_imports_form_no_cycle(top_level_only):
    "Neither the module-level imports nor those inside functions (done when first called) loop back."
    graph = {m: imports_of(m, top_level_only=top_level_only) - {m} for m in MODULES}
    assert cycle(graph) is None
    assert "activations" in graph["reference"] and "reference" not in graph["corpus"]  # the cycle that was


def test_sub_package_modules_are_found_and_their_relative_imports_resolved():
    assert {"grid", "tables", "experiments.paper", "experiments.comparison"} <= set(MODULES)
    assert {"grid", "core", "models"} <= imports_of("experiments.paper", top_level_only=True)
    assert {"grid", "tables", "scoring", "registry"} <= imports_of("experiments.comparison", top_level_only=True)
    assert "grid" in imports_of("cli", top_level_only=True)


def test_charts_imports_no_saealign_module():
    "Every module can draw its charts with charts.chart without an import cycle."
    assert imports_of("charts", top_level_only=False) == set()


def test_every_module_says_what_it_holds():
    for name, path in MODULES.items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, f"{name}.py has no first docstring line"


@pytest.mark.parametrize("pattern, home", [
    (r"\.pad_token_id\s+is\s+not\s+None", "activations"),          # the padding id: activations.pad_id
    (r"all_special_ids|get_special_token_ids", "activations"),        # special tokens: activations.special_ids
    (r"must be a positive int", "_utils"),                            # counts: _utils.check_positive_int
    (r"must be a finite number in", "_utils"),                        # finite numbers: _utils.finite_number
    (r"sha256\(json\.dumps", "core"),                                 # JSON digests: core.json_sha256
    (r"import altair|import_module\(\"altair\"\)", "charts"),          # altair, without IRI parsers: charts.import_altair
])
def test_each_small_concept_has_one_home(pattern, home):
    homes = sorted(name for name, path in MODULES.items() if re.search(pattern, path.read_text()))
    assert homes == [home]


def test_charts_are_drawn_with_the_one_helper():
    drawing = {name for name, path in MODULES.items() if re.search(r"alt\.Chart\(", path.read_text())}
    assert drawing == {"charts"}


# modules past ~500 lines, each with the chapter that says why it stays one module
LONG_MODULES = {"reference": "01_reference.ipynb", "models": "00a_models.ipynb"}


def test_a_long_module_says_why_in_its_chapter():
    long = {name for name, path in MODULES.items() if len(path.read_text().splitlines()) > 510}
    assert long <= set(LONG_MODULES), f"{sorted(long - set(LONG_MODULES))} grew past ~500 lines: split them or say why"
    for chapter in LONG_MODULES.values():
        assert "500 lines" in (PACKAGE.parent / "nbs" / chapter).read_text()
