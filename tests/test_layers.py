"""The import rule (README, "How it works"): each package imports only from its own layer and the
layers below it, checked by parsing every module's imports, lazy ones inside functions included."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "edgepanel"

# lowest first; a module may import from its own layer and the layers before it
LAYERS = [
    {"errors", "progress", "bits", "format", "rotation", "tokenizer", "assets"},
    {"kernels", "sample"},        # the sampler draws in C when the kernels are built
    {"model"},
    {"quantize"},
    {"panels"},
    {"tune"},
    {"convert"},
    {"hub"},
    {"export", "serve", "bench"},
    {"cli", "__main__"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def unit(parts):
    """The layer unit of a module path inside edgepanel (its first component)."""
    first = parts[0]
    return first[:-3] if first.endswith(".py") else first


def imports(path: Path):
    """(line, imported edgepanel unit) for every import in `path`."""
    rel = path.relative_to(PKG).parts
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("edgepanel."):
                    yield node.lineno, a.name.split(".")[1]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("edgepanel"):
                    parts = node.module.split(".")[1:]
                    names = parts[:1] or [a.name for a in node.names]
                    for n in names:
                        yield node.lineno, n
                continue
            base = list(rel[:-1])[: len(rel) - node.level]      # the package the dots lead to
            parts = base + (node.module.split(".") if node.module else [])
            if parts:
                yield node.lineno, parts[0]
            else:                                              # `from .. import x, y`
                for a in node.names:
                    yield node.lineno, a.name


def test_every_unit_has_a_layer():
    units = {unit(p.relative_to(PKG).parts) for p in PKG.rglob("*.py")} - {"__init__"}
    assert units <= set(LEVEL), f"modules with no layer in LAYERS: {sorted(units - set(LEVEL))}"


def test_imports_flow_one_way():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        src = unit(path.relative_to(PKG).parts)
        if src == "__init__":    # the package's own lazy entry points (load, Model)
            continue
        for line, dst in imports(path):
            dst = "__init__" if dst in ("__version__",) else dst
            if dst == "__init__" or dst not in LEVEL:
                continue
            if LEVEL[dst] > LEVEL[src]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {src} (layer {LEVEL[src]}) imports {dst} (layer {LEVEL[dst]})")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    """The rule can fail: a kernels module importing the model layer is reported."""
    global PKG
    fake = tmp_path / "edgepanel"
    (fake / "kernels").mkdir(parents=True)
    (fake / "kernels" / "x.py").write_text("def f():\n    from ..model import load\n")
    monkeypatch.setattr(__import__(__name__), "PKG", fake)
    assert list(imports(fake / "kernels" / "x.py")) == [(2, "model")]


def test_the_readme_module_map_names_every_module():
    """README's module map matches the tree: every module and package of edgepanel/ and every
    C file is named in it."""
    readme = (PKG.parent / "README.md").read_text(encoding="utf-8")
    start = readme.index("**Module map.**")
    section = readme[start:readme.index("**Import rule.**", start)]
    missing = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name in ("__init__.py", "__main__.py"):
            continue
        stem = path.stem
        if stem not in section:
            missing.append(str(path.relative_to(PKG.parent)))
    for pkg in sorted(p for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        if f"edgepanel/{pkg.name}/" not in section:
            missing.append(f"edgepanel/{pkg.name}/")
    for c in sorted((PKG.parent / "csrc").rglob("*.[ch]")):
        if c.name not in section:
            missing.append(str(c.relative_to(PKG.parent)))
    assert not missing, f"modules the README's module map does not name: {missing}"


def test_the_readme_stays_short():
    """The README keeps the summary; measurements live in docs/ (each with its command)."""
    lines = (PKG.parent / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < 250, f"README.md has {len(lines)} lines: move details to docs/"
