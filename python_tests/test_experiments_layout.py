"""The house rules of rmt_fast.experiments: `import rmt_fast` stays light, dependencies point one way
(experiments -> library -> ops) and the experiments' modules import each other without cycles."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "rmt_fast")
EXP = os.path.join(PKG, "experiments")


def _imports(path: str, package: str) -> set[str]:
    """Absolute names of the rmt_fast modules a file imports (module level and inside functions)."""
    tree = ast.parse(open(path).read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("rmt_fast")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("rmt_fast"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _module_files(root: str, prefix: str):
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), root)[:-3].replace(os.sep, ".")
                name = prefix if rel == "__init__" else f"{prefix}.{rel.removesuffix('.__init__')}"
                yield name, os.path.join(dirpath, f), f == "__init__.py"


def test_import_rmt_fast_is_light():
    code = ("import sys, rmt_fast; bad = [m for m in sys.modules if m.startswith(('matplotlib', 'rmt_fast.tasks', "
            "'rmt_fast.experiments'))]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert r.returncode == 0, r.stderr[-2000:]


def test_library_does_not_import_experiments():
    for name, path, _ in _module_files(PKG, "rmt_fast"):
        if name.startswith("rmt_fast.experiments"):
            continue
        bad = {m for m in _imports(path, name.rsplit(".", 1)[0] if not path.endswith("__init__.py") else name)
               if m.startswith("rmt_fast.experiments")}
        assert not bad, f"{name} imports {bad}"


def test_experiments_package_is_light_and_acyclic():
    graph = {}
    for name, path, is_pkg in _module_files(EXP, "rmt_fast.experiments"):
        package = name if is_pkg else name.rsplit(".", 1)[0]
        graph[name] = {m for m in _imports(path, package) if m.startswith("rmt_fast.experiments")}
    assert graph["rmt_fast.experiments"] == set()  # the package's __init__ imports nothing
    modules = set(graph)
    edges = {a: {b for b in deps if b in modules and b != a and not a.startswith(b + ".")} for a, deps in graph.items()}

    def reach(a, seen):
        for b in edges[a]:
            if b not in seen:
                seen.add(b)
                reach(b, seen)
        return seen

    cycles = [a for a in modules if a in reach(a, set())]
    assert not cycles, f"import cycles through {sorted(cycles)}"
    assert "rmt_fast.experiments.trainer" not in reach("rmt_fast.experiments.evaluate", set())
