"""Every connector module exports exactly its public names, all importable and documented."""

from __future__ import annotations

import importlib

import pytest

MODULES = [
    "connectors",
    "connectors.codecs",
    "connectors.tensors",
    "connectors.kafka",
    "connectors.mqtt",
    "connectors.sockets",
    "connectors.files",
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
        "bad = [m for m in ('aiokafka', 'aiomqtt', 'paho', 'connectors') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
