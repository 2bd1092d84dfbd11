"""The house by DAG phase: cpal/ has one folder per phase, layers import only downwards, and every DVC
stage depends on exactly the code it imports (so editing one phase reruns that phase and what follows)."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml
from pipeline_workspace import DVC_FILES

ROOT = Path(__file__).resolve().parents[1]
CPAL = ROOT / "cpal"
# Lowest first: a unit may import itself and the units before it, never one after it.
LAYERS = ["core", "data", "backbone", "plugin", "cls", "seeds", "crf", "irn", "amn", "pseudo", "seg", "report"]


def module_file(name: str) -> Path | None:
    """The file of a dotted module name under the repository, or None (third-party, stdlib)."""
    base = ROOT.joinpath(*name.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def imports(path: Path) -> set[str]:
    """Every module (or module.attribute) a file imports, function-level imports included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in found if n.split(".")[0] in ("cpal", "stages")}


def local_deps(path: Path) -> set[Path]:
    """Files of cpal/ and stages/ that ``path`` imports, directly or not."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        for name in imports(f):
            target = module_file(name)
            if target is not None:
                todo.append(target)
    return seen


def unit(path: Path) -> str | None:
    """The cpal unit a file belongs to: its phase folder or top-level module name (None outside cpal/)."""
    rel = path.relative_to(ROOT)
    if rel.parts[0] != "cpal" or path.name == "__init__.py" and len(rel.parts) == 2:
        return None
    return rel.parts[1].removesuffix(".py")


def dep_path(name: str) -> str:
    return f"cpal/{name}" if (CPAL / name).is_dir() else f"cpal/{name}.py"


def test_top_level_holds_few_modules():
    modules = sorted(p.name for p in CPAL.glob("*.py"))
    assert len(modules) <= 8, modules
    folders = {p.name for p in CPAL.iterdir() if p.is_dir() and not p.name.startswith("__")}
    tops = {Path(m).stem for m in modules} - {"__init__"}
    assert folders | tops == set(LAYERS), "every folder and top-level module has its place in LAYERS"


def test_imports_go_downwards_only():
    bad = []
    for f in CPAL.rglob("*.py"):
        src = unit(f)
        if src is None:
            continue
        for name in imports(f):
            target = module_file(name)
            dst = unit(target) if target is not None else None
            if dst is not None and LAYERS.index(dst) > LAYERS.index(src):
                bad.append(f"{f.relative_to(ROOT)} ({src}) imports {name} ({dst})")
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_dvc_deps_name_the_code_each_stage_imports():
    dvc = {}
    for dvc_file in DVC_FILES:
        declared = yaml.safe_load((ROOT / dvc_file).read_text())["stages"]
        dvc.update({name: stage.get("do") or stage for name, stage in declared.items()})  # a foreach stage's `do`
    problems = []
    for name, stage in dvc.items():
        module = stage["cmd"].split()[2]  # python -m stages.X ...
        entry = ROOT / (module.replace(".", "/") + ".py")
        files = local_deps(entry)
        want = {str(f.relative_to(ROOT)) for f in files if f.parts[-2] == "stages" and f.name != "__init__.py"}
        want |= {dep_path(u) for u in filter(None, map(unit, files))}
        have = {d for d in stage["deps"] if d.startswith(("cpal/", "stages/")) and not d.endswith(".json")}
        if want != have:
            problems.append(f"{name}: missing {sorted(want - have)}, not imported {sorted(have - want)}")
    assert not problems, "\n".join(problems)
