"""The package's layout, read from its source: imports flow one way and never in a circle.

    cli → pipeline → schedules | lm → runs → training | criteria | retrain | data | models → core → config

Every import counts, also those inside functions (a lazy import still ties the modules), but
not those under `if TYPE_CHECKING:` (annotations only). The
package's own __init__ is the API facade: it loads the public names lazily from every layer and
holds only __version__ for them, so it stands outside the layers."""

import ast
from pathlib import Path

import prunebench

ROOT = Path(prunebench.__file__).parent

# each layer may import only the layers after it (and itself)
LAYERS = [
    {"cli", "__main__"},
    {"pipeline", "report"},
    {"schedules", "lm"},
    {"runs"},
    {"training", "criteria", "retrain", "data", "models"},
    {"core"},
    {"config"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set:
    """The prunebench modules `path` imports (as dotted names below prunebench)."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    for block in [n for n in ast.walk(tree) if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING"]:
        block.body = []  # imports for type annotations only tie nothing at run time
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and node.module.startswith("prunebench"):
                target = node.module[len("prunebench."):] if node.module != "prunebench" else ""
            else:
                continue
            for alias in node.names:  # `from . import x` may name a module
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(sub if (ROOT / sub.replace(".", "/")).with_suffix(".py").exists()
                          or (ROOT / sub.replace(".", "/") / "__init__.py").exists() else target)
        elif isinstance(node, ast.Import):
            found.update(a.name[len("prunebench."):] for a in node.names if a.name.startswith("prunebench."))
    return {m for m in found if m != mod}


def graph() -> dict:
    return {module_name(p): imports(p) for p in ROOT.rglob("*.py") if "conf" not in p.relative_to(ROOT).parts}


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if top in names)


def test_no_module_imports_a_module_that_imports_it_back():
    g = graph()
    state, stack, circles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in g.get(m, ()):
            if n not in g:
                continue
            if state.get(n) == "open":
                circles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not circles, "import circles: " + "; ".join(" → ".join(c) for c in circles)


def test_imports_flow_down_the_layers():
    upward = [f"{m} → {n}" for m, targets in graph().items() if m for n in targets
              if n and layer_of(n) < layer_of(m)]
    assert not upward, "imports against the layers: " + ", ".join(sorted(upward))


def test_the_config_layer_imports_no_torch():
    """A wrong option is answered before torch loads (scripts/bench_cli.py)."""
    for path in (ROOT / "config").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "torch" not in names, path
