"""The code's shape: the contract package stands alone, and functions stay short enough to read."""

import ast
from pathlib import Path

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
