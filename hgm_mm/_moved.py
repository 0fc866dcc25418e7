"""The module paths of hgm_mm before its modules moved into packages, kept importable.

`import hgm_mm.matching` gives the module `hgm_mm.ranking.matcher` itself (the same object, so
attributes and patches are shared) with a `DeprecationWarning` naming the new path.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {  # old name under hgm_mm -> new name under hgm_mm
    "scenes": "data.scenes",
    "calibration": "models.calibration",
    "config": "models.config",
    "pretrained": "models.pretrained",
    "towers": "models.towers",
    "preprocess": "models.preprocess",
    "scene_heads": "models.scene_heads",
    "scene_text": "models.scene_text",
    "fusion": "models.fusion",
    "model_card": "models.model_card",
    "model_folder": "models.folder",
    "model": "models.hgm",
    "factory": "models.factory",
    "inference": "models.export",
    "index": "retrieval.index",
    "milvus_index": "retrieval.milvus",
    "catalog_vectors": "embedding.catalog_vectors",
    "grad_cache": "losses.grad_cache",
    "prior": "ranking.prior",
    "ranking_weights": "ranking.weights",
    "profile": "ranking.profile",
    "catalog": "ranking.catalog",
    "matching": "ranking.matcher",
    "serving": "apps.serving",
    "service": "apps.service",
    "demo": "apps.demo",
    "cli": "apps.cli",
}


def new_module_name(fullname: str) -> str | None:
    """The module an old `hgm_mm.…` name now lives at, or None when the name did not move."""
    package, _, rest = fullname.partition(".")
    if package != "hgm_mm" or not rest:
        return None
    first, _, below = rest.partition(".")
    if first not in MOVED:
        return None
    return f"hgm_mm.{MOVED[first]}" + (f".{below}" if below else "")


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old module name with the moved module (first on `sys.meta_path`, so a submodule
    of a moved package is never loaded a second time under its old name)."""

    def find_spec(self, fullname, path=None, target=None):
        if new_module_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = new_module_name(spec.name)
        warnings.warn(f"{spec.name} has moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        module = importlib.import_module(new)
        self._own_spec = module.__spec__  # the import system sets __spec__ to the alias's next
        return module

    def exec_module(self, module):
        module.__spec__ = self._own_spec


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
