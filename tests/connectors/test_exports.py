"""Every connector module exports exactly its public names, all importable and documented."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

MODULES = [
    "streamflow.connectors",
    "streamflow.connectors.codecs",
    "streamflow.connectors.tensors",
    "streamflow.connectors.kafka",
    "streamflow.connectors.mqtt",
    "streamflow.connectors.sockets",
    "streamflow.connectors.files",
]


@pytest.mark.parametrize("name", MODULES)
def test_public_names_are_exported_and_documented(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__doc__
    exported = set(module.__all__)
    assert len(exported) == len(module.__all__)
    public = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and getattr(v, "__module__", "").startswith(name)
    }
    assert public <= exported
    for attr in exported:
        value = getattr(module, attr)
        if callable(value):
            assert value.__doc__, f"{name}.{attr} has no docstring"


def test_the_core_never_imports_a_connector_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, streamflow, streamflow.testing\n"
        "bad = [m for m in ('aiokafka', 'aiomqtt', 'paho', 'streamflow.connectors') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_connectors_install_under_streamflow_only() -> None:
    """The folder is connectors/ at the top of the repository; installed, it is
    streamflow.connectors, and no top-level ``connectors`` package is installed."""
    from importlib.metadata import distribution

    import streamflow.connectors

    assert streamflow.connectors.__name__ == "streamflow.connectors"
    assert Path(streamflow.connectors.__file__).parent.name == "connectors"
    top_level = (distribution("streamflow").read_text("top_level.txt") or "").split()
    assert top_level == ["streamflow"]
