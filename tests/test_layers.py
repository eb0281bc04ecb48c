"""The package's shape: the layers of `.importlinter` cover every module, no import circle (imports
inside functions counted), no private name crosses a module, and an import inside a function is only
ever of an optional (or heavy, lazily loaded) third-party package. `make test` runs the layer contract
itself (`lint-imports`)."""
import ast
import configparser
from pathlib import Path

from tests.extras import require

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cvfast"
# Third-party packages a cvfast function may import on first use: optional extras (ONNX, TensorRT,
# FlashAttention, SageAttention, PyAV, psutil, FastAPI and uvicorn for `cvfast serve`) and heavy ones only some paths need (transformers, the hub client,
# image and video codecs).
LAZY_PACKAGES = {"onnx", "onnxruntime", "onnx_ir", "onnxscript", "ml_dtypes", "tensorrt", "flash_attn",
                 "flash_attn_interface", "transformers", "tokenizers", "huggingface_hub", "PIL", "imageio_ffmpeg",
                 "av", "psutil", "sageattention", "fastapi", "uvicorn"}
EXTENSION = "_C"  # the compiled cvfast._C (csrc/): a leaf module grimp cannot read


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def imported_module(importer: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module an `from X import ...` names."""
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def layers() -> list[list[str]]:
    config = configparser.ConfigParser()
    config.read(ROOT / ".importlinter")
    lines = config["importlinter:contract:layers"]["layers"].split("\n")
    return [[name.strip() for name in line.split("|")] for line in lines if line.strip()]


def test_every_module_is_in_exactly_one_layer():
    members = [name for layer in layers() for name in layer]
    assert len(members) == len(set(members))
    for name in modules():
        if name in ("cvfast", "cvfast.__main__"):
            continue
        owners = [m for m in members if name == m or name.startswith(m + ".")]
        assert len(owners) == 1, f"{name} is in layers {owners}: add it to .importlinter"


def test_no_import_circle():
    grimp = require("grimp")
    graph = grimp.build_graph("cvfast", include_external_packages=False)
    edges = {}
    for importer in graph.modules:
        edges[importer] = set()
        for imported in graph.find_modules_directly_imported_by(importer):
            details = graph.get_import_details(importer=importer, imported=imported)
            if imported == "cvfast" and all(f"import {EXTENSION}" in d["line_contents"] for d in details):
                continue  # cvfast._C, seen by grimp as the package root
            edges[importer].add(imported)
    # Tarjan's strongly connected components: any with two or more modules is a circle.
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert circles == []


def private_imports(name: str, tree: ast.Module, is_package: bool) -> list[str]:
    """`from <a cvfast, tests or benchmarks module> import _x` and `<such a module>._x` in one module."""
    found, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = imported_module(name, node, is_package)
            if source.split(".")[0] in ("cvfast", "tests", "benchmarks"):
                for alias in node.names:
                    aliases.add(alias.asname or alias.name)
                    if alias.name.startswith("_") and alias.name != EXTENSION:
                        found.append(f"{name}:{node.lineno} imports {alias.name} from {source}")
        elif isinstance(node, ast.Import):
            aliases.update(a.asname or a.name.split(".")[0] for a in node.names
                           if a.name.split(".")[0] in ("cvfast", "tests", "benchmarks"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{name}:{node.lineno} uses {node.value.id}.{node.attr}")
    return found


def test_no_private_name_crosses_a_module():
    found = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        found += private_imports(module_name(path), ast.parse(path.read_text()), path.name == "__init__.py")
    assert found == []


def test_imports_inside_functions_are_only_lazy_third_party_packages():
    found = []
    for name, tree in modules().items():
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    roots = [a.name.split(".")[0] for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    roots = ["cvfast" if node.level else (node.module or "").split(".")[0]]
                else:
                    continue
                found += [f"{name}:{node.lineno} imports {root}" for root in roots if root not in LAZY_PACKAGES]
    assert found == []


def test_the_checks_find_what_they_look_for():
    """Each check above reports a planted violation."""
    planted = ast.parse("from .checkpoints import _secret\nimport cvfast.models as m\nm._hidden\n")
    assert len(private_imports("cvfast.api", planted, False)) == 2
    fn = ast.parse("def f():\n    from .ops import resolve\n    import numpy\n")
    imports = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert {"cvfast" if getattr(n, "level", 0) else n.names[0].name for n in imports} - LAZY_PACKAGES == {
        "cvfast", "numpy"}
