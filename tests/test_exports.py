"""The public surface: every exported name exists, is documented, and the package is typed."""

import importlib
import inspect
from pathlib import Path

import pytest

import streamflow as sf

PUBLIC_MODULES = ["streamflow", "streamflow.parallel", "streamflow.testing"]


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_every_exported_name_exists_and_is_documented(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__doc__
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"{module_name}.{name} has no docstring"


def test_no_private_names_exported() -> None:
    assert all(not name.startswith("_") for name in sf.__all__)
    public = {n for n in dir(sf) if not n.startswith("_")}
    # submodules (private ones start with "_") and the documented extras are all that is left
    assert public - set(sf.__all__) <= {"testing", "parallel", "contrib", "connectors"}


def test_typed_marker_ships() -> None:
    assert (Path(sf.__file__).parent / "py.typed").exists()
