"""The code's shape: the contract package stands alone, and functions stay short enough to read."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kava", "kava_common", "kava_demo", "stage1_extract", "stage2_train")
MAX_FUNCTION_LINES = 60


def modules(package):
    return sorted((ROOT / package).rglob("*.py"))


def imported(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_kava_common_imports_no_stage():
    found = {str(p.relative_to(ROOT)): sorted(imported(p) & {"stage1_extract", "stage2_train", "kava_demo"})
             for p in modules("kava_common")}
    assert {p: n for p, n in found.items() if n} == {}
    assert len(found) >= 10                      # the scan saw the package's modules


def test_no_function_longer_than_a_screen():
    long = []
    for package in PACKAGES:
        for p in modules(package):
            for node in ast.walk(ast.parse(p.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


@pytest.mark.slow
def test_importing_the_contract_changes_nothing_in_the_process():
    """kava_common is the contract: importing it (every module of it) sets no environment
    variable and imports no stage; the entry points' packages apply the process settings."""
    import subprocess
    import sys
    mods = sorted({".".join(p.relative_to(ROOT).with_suffix("").parts) for p in modules("kava_common")
                   if p.name != "__main__.py"})
    code = ("import os, sys; before = dict(os.environ); import " + ", ".join(m.removesuffix(".__init__") for m in mods)
            + "; print(sorted(k for k in os.environ if os.environ.get(k) != before.get(k)), "
              "sorted(m for m in sys.modules if m.split('.')[0] in ('stage1_extract', 'stage2_train', 'kava_demo', 'kava')))")
    env = {k: v for k, v in __import__("os").environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[] []"
    r = subprocess.run([sys.executable, "-c", "import os, stage2_train; print(os.environ['THP_MEM_ALLOC_ENABLE'])"],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.stdout.strip() == "1"


def relative_imports(path):
    """Modules of the same package that `path` imports (from .x import ..., at any depth)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_no_import_circle_in_a_package():
    """Modules of one package import each other in one direction only (imports inside
    functions too: a lazy import hides a circle, it does not remove it)."""
    circles = []
    for package in PACKAGES + ("kava_common/cache",):
        folder = ROOT / package
        deps = {p.stem: relative_imports(p) for p in folder.glob("*.py")}
        for a, targets in deps.items():
            for b in targets:
                if a < b and a in deps.get(b, set()):
                    circles.append(f"{package}: {a} <-> {b}")
    assert circles == []


def test_the_trainer_holds_no_collective_and_no_one_reads_a_caches_private_shards():
    """torch.distributed is stage2_train.ranks' business; the cache's shards are read through
    its public methods (rows(), shards(), kv(), ...) outside kava_common/cache/."""
    assert "distributed" not in (ROOT / "stage2_train" / "trainer.py").read_text()
    outside = [str(p.relative_to(ROOT)) for package in PACKAGES + ("bench", "tests") for p in modules(package)
               if "kava_common/cache/" not in str(p) and p.name != "test_layout.py" and "._shards" in p.read_text()]
    assert outside == []


def test_the_contract_holds_no_test_or_benchmark_helper():
    """Tiny model builders live in kava_demo.tiny and the benchmarks' statistics in bench/."""
    assert not (ROOT / "kava_common" / "tiny.py").exists() and (ROOT / "kava_demo" / "tiny.py").is_file()
    assert not (ROOT / "stage2_train" / "stats.py").exists() and (ROOT / "bench" / "stats.py").is_file()
    stages = [str(p.relative_to(ROOT)) for package in ("kava_common", "stage1_extract", "stage2_train")
              for p in modules(package) if "kava_demo" in imported(p)]
    assert stages == []


def test_the_stages_read_a_cache_manifest_by_field():
    """Outside kava_common, a cache's manifest is read through `KVCache.meta` (fields), never by
    string key into the JSON object."""
    import re
    keyed = re.compile(r"manifest(\[|\.get\()")
    found = [f"{p.relative_to(ROOT)}:{i}" for package in ("stage1_extract", "stage2_train", "kava", "kava_demo")
             for p in modules(package) for i, line in enumerate(p.read_text().splitlines(), 1) if keyed.search(line)]
    assert found == []
