"""The house's floors: who may import whom, read from the code's own import statements (lazy ones included).

cli/                 the command line, the demo and the tools: may import everything below
ray_jobs/  serve/    the Ray jobs and the Ray Serve application: the library, never each other
miniature/           the toy world and its tiny checkpoints: the library only
gap3d/               the method: itself only, and no Ray
"""

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("gap3d", "miniature", "ray_jobs", "serve", "cli")
ALLOWED = {
    "gap3d": {"gap3d"},
    "miniature": {"gap3d", "miniature"},
    "ray_jobs": {"gap3d", "ray_jobs"},
    "serve": {"gap3d", "serve"},
    "cli": {"gap3d", "miniature", "ray_jobs", "serve", "cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    files = {module_name(path): path for package in PACKAGES for path in (REPO / package).rglob("*.py")}
    return {name: {target for target in imports(path) if target in files} for name, path in files.items()}


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_the_floors_below_it(package):
    offending = sorted(
        f"{module_name(path)} imports {target}"
        for path in (REPO / package).rglob("*.py")
        for target in imports(path)
        if target.split(".")[0] in PACKAGES and target.split(".")[0] not in ALLOWED[package]
    )
    assert offending == []


def test_the_library_never_imports_ray():
    offending = sorted(
        module_name(path)
        for path in (REPO / "gap3d").rglob("*.py")
        if any(t.split(".")[0] == "ray" for t in imports(path))
    )
    assert offending == []


def test_reading_a_config_is_a_leaf_of_the_library(graph):
    assert graph["gap3d.config"] <= {"gap3d.presets"}


def test_no_module_takes_part_in_an_import_cycle(graph):
    # Tarjan's strongly connected components: a component of more than one module is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert cycles == []


def test_no_code_reads_or_writes_ray_trains_own_files():
    # Ray Train's bookkeeping (its checkpoint manager snapshot) is Ray's; we reach checkpoints through its API only.
    mentions = defaultdict(list)
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            if "checkpoint_manager_snapshot" in path.read_text():
                mentions[package].append(module_name(path))
    assert dict(mentions) == {}
