"""The module paths before the package layout still import, as the moved modules themselves."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest

from hgm_mm import _moved


def forget(name: str) -> None:
    """Drops an old name from the import cache, so that importing it goes through the finder again."""
    for cached in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        if _moved.new_module_name(cached) is not None:
            del sys.modules[cached]


@pytest.mark.parametrize("old", sorted(f"hgm_mm.{name}" for name in _moved.MOVED))
def test_an_old_module_path_is_the_moved_module_with_a_warning(old):
    forget(old)
    with pytest.warns(DeprecationWarning, match=_moved.new_module_name(old).replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(_moved.new_module_name(old))
    assert module.__spec__.name == _moved.new_module_name(old)  # the moved module keeps its own spec


def test_a_submodule_of_a_moved_package_is_not_loaded_twice():
    forget("hgm_mm.towers")
    with pytest.warns(DeprecationWarning):
        from hgm_mm.towers.hf_tower import HFTextTower
    from hgm_mm.models.towers.hf_tower import HFTextTower as moved
    assert HFTextTower is moved


def test_old_names_are_not_files_any_more_and_new_names_are():
    package = importlib.import_module("hgm_mm").__path__[0]
    for old, new in _moved.MOVED.items():
        assert not os.path.exists(os.path.join(package, old + ".py")), f"hgm_mm/{old}.py is back beside its new home"
        assert importlib.util.find_spec(f"hgm_mm.{new}") is not None


def test_names_that_did_not_move_are_left_to_the_import_system():
    assert _moved.new_module_name("hgm_mm.training") is None
    assert _moved.new_module_name("hgm_mm.losses") is None  # now a package of its own, re-exporting the losses
    assert _moved.new_module_name("hgm_mm") is None
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("hgm_mm.no_such_module")
