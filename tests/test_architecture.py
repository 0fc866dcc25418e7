"""docs/architecture.md's layout table is the import rule: a module imports only modules listed above it.

Every `hgm_mm` import is checked, at module level and inside functions alike (a deferred import
still ties the two modules together). Modules of a package listed as one row (`hgm_mm/training/`)
may import each other; a module with a row of its own stands there; a package's `__init__` without
a row stands on the row of its lowest module, since it re-exports them.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hgm_mm"
ROW = re.compile(r"^\| `(hgm_mm/[^`]*)` \|", re.MULTILINE)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def layout_rows() -> list[str]:
    """The table's hgm_mm entries, top to bottom, as dotted names (a package row ends with a dot)."""
    rows = []
    for entry in ROW.findall((REPO / "docs" / "architecture.md").read_text(encoding="utf-8")):
        if entry.endswith("/"):
            rows.append(entry.rstrip("/").replace("/", ".") + ".")
        elif entry.endswith(".py"):
            rows.append(entry[:-3].replace("/", "."))
    return rows


def row_of(module: str, rows: list[str]) -> int | None:
    if module in rows:  # a row of its own comes before its package's row
        return rows.index(module)
    for position, row in enumerate(rows):
        if row.endswith(".") and (module + ".").startswith(row):
            return position
    if MODULES.get(module, Path()).name == "__init__.py":  # a package: the row of its lowest module
        children = [row_of(m, rows) for m in MODULES if m.startswith(module + ".")]
        children = [c for c in children if c is not None]
        return max(children) if children else None
    return None


def imports_of(module: str) -> set[str]:
    """The hgm_mm modules `module` imports, anywhere in its file."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("hgm_mm"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("hgm_mm"):
                target = node.module
            else:
                continue
            # `from .evaluation import metrics` imports the module hgm_mm.evaluation.metrics
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES]
            found.update(submodules or [target])
    return found - {module}


CHECKED = sorted(m for m in MODULES if m not in ("hgm_mm", "hgm_mm.__main__"))


def test_every_module_has_a_row_in_the_layout_table():
    rows = layout_rows()
    missing = [m for m in CHECKED if row_of(m, rows) is None]
    assert not missing, f"modules without a row in docs/architecture.md's layout table: {missing}"


def upward_imports(module: str, rows: list[str]) -> list[str]:
    own = row_of(module, rows)
    return sorted(target for target in imports_of(module)
                  if target in MODULES and (row_of(target, rows) or 0) > (own or 0))


@pytest.mark.parametrize("module", CHECKED)
def test_imports_flow_down_the_layout_table(module):
    rows = layout_rows()
    upward = upward_imports(module, rows)
    assert not upward, (f"{module} (row {row_of(module, rows)} of docs/architecture.md) imports {upward}, listed "
                        "below it; move the shared code down, or the rows, so that imports flow one way")


def test_the_checker_sees_an_upward_import():
    rows = layout_rows()
    assert "hgm_mm.files" in imports_of("hgm_mm.ranking.catalog")
    assert "hgm_mm.evaluation.metrics" in imports_of("hgm_mm.evaluation.evaluate")  # `from . import metrics`
    assert "hgm_mm.ranking.catalog" in upward_imports("hgm_mm.ranking.matcher", rows[::-1])
