"""The package's layers, pinned: what each layer may import, which modules stay free of torch, and
that no module reaches into another's private names."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sparta"
# modules that read results and write tables, plots and verdicts: usable where torch is not installed
# (imported here without torch; a report is written with torch unimportable below)
TORCH_FREE = ["sparta.claims", "sparta.runs", "sparta.report", "sparta.plots", "sparta.pareto", "sparta.fmt",
              "sparta.paired", "sparta.outcomes", "sparta.calibration", "sparta.config", "sparta.method_config"]
# sparta modules each lower layer may import, beside its own package, the standard library, torch and numpy
LOWER_LAYERS = {
    "sparse": {"sparta.errors", "sparta.registry", "sparta.method_config"},  # method_config: the early-bird thresholds
    "models": {"sparta.errors", "sparta.registry"},
    "attacks": {"sparta.errors", "sparta.registry", "sparta.distributed"},  # distributed: FMN tuning over ranks
    "data": {"sparta.errors", "sparta.registry"},
}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _dotted(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(absolute module, imported names) of every ``import``/``from ... import`` in ``path``."""
    package = _dotted(path) if path.name == "__init__.py" else _dotted(path).rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            out.append((module, [a.name for a in node.names]))
    return out


@pytest.mark.parametrize("layer", sorted(LOWER_LAYERS))
def test_lower_layers_import_nothing_above_them(layer):
    allowed = LOWER_LAYERS[layer]
    bad = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for module, names in _imports(path):
            targets = [module] if names == [] else [module, *(f"{module}.{n}" for n in names)]
            if module.startswith("sparta") and not module.startswith(f"sparta.{layer}"):
                if not any(t in allowed for t in targets):
                    bad.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not bad, bad


def test_the_reporting_modules_import_no_torch():
    code = f"import sys; import {', '.join(TORCH_FREE)}; print(sorted(m for m in ('torch',) if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_report_is_written_where_torch_cannot_be_imported(tmp_path):
    """``sparta report``'s work (reading run folders, tables, PNGs, the claims) never needs torch."""
    runs = [str(PACKAGE.parent / "results" / "cpu-mini-cifar10-previous" / "runs" / name)
            for name in ("dense", "flying_bird_plus")]
    code = ("import sys; sys.modules['torch'] = None\n"  # any `import torch` now raises ImportError
            "from sparta.report import write_report\n"
            f"write_report({runs!r}, {str(tmp_path)!r})")
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "flying_bird_plus" in (tmp_path / "report.md").read_text()
    assert list((tmp_path / "plots").glob("*.png"))  # matplotlib's figures, drawn without torch


def test_no_private_name_is_imported_across_modules():
    bad = []
    for path in _modules():
        for module, names in _imports(path):
            if module.startswith("sparta"):
                bad += [f"{path.relative_to(PACKAGE)}: {n} from {module}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_the_checks_see_imports():
    """The scan itself: relative imports resolve to absolute names, private names are seen."""
    imports = dict(_imports(PACKAGE / "sparse" / "early_bird.py"))
    assert "sparta.errors" in imports and "sparta.sparse.masks" in imports


def test_the_readme_code_map_names_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    code_map = readme[readme.index("## Code map"):readme.index("A new method plugs in at")]
    missing = [str(p.relative_to(PACKAGE.parent)) for p in _modules()
               if f"`{p.relative_to(PACKAGE.parent)}`" not in code_map.replace("\n  ", " ")]
    assert not missing, missing
