"""The checkpoint store: state round-trips without pickle, writes are atomic (a torn or
corrupt checkpoint is skipped for the one before it), the newest N are kept, and state a
checkpoint cannot hold is refused naming the stage."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from streamflow._checkpoint_store import DirectoryStore
from streamflow._snapshot_codec import StateTypeError, decode_state, encode_state

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary()
keys = st.none() | st.booleans() | st.integers() | st.text() | st.tuples(st.integers(), st.text())
states = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(keys, inner, max_size=4)
        | st.dictionaries(st.text(), inner, max_size=4)
    ),
    max_leaves=20,
)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return type(b) is dict and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=400, deadline=None)
@given(states)
def test_any_plain_state_round_trips(state: Any) -> None:
    text, tensors = encode_state(state, "stage 'x'")
    assert tensors == {}
    assert same(decode_state(text, tensors), state)


def test_a_tensor_twice_and_views_sharing_memory_are_stored(tmp_path: Path) -> None:
    """safetensors refuses tensors that share memory: the same tensor is stored once, a
    view of a stored one as a copy."""
    batch = torch.randn(6, 3)
    state = {"pending": [(batch, batch[0]), (batch, batch[1])], "again": batch}
    store = DirectoryStore(tmp_path / "ckpt")
    store.write(1, {}, {}, {"learn": state})
    back = store.latest()
    assert back is not None
    got = back.states["learn"]
    assert torch.equal(got["again"], batch) and torch.equal(got["pending"][1][1], batch[1])
    assert len(list((tmp_path / "ckpt").glob("*/state-0.safetensors"))) == 1


def test_tensors_go_to_safetensors_and_come_back(tmp_path: Path) -> None:
    weights = {"w": torch.randn(3, 4), "b": torch.arange(4)}
    store = DirectoryStore(tmp_path / "ckpt")
    store.write(1, {"stages": ["learn"]}, {"kafka": {("t", 0): 41}}, {"learn": weights})
    back = store.latest()
    assert back is not None and back.id == 1
    assert back.positions == {"kafka": {("t", 0): 41}}
    assert torch.equal(back.states["learn"]["w"], weights["w"])
    assert torch.equal(back.states["learn"]["b"], weights["b"])
    assert not any(p.suffix == ".pkl" for p in back.path.iterdir())


def test_unsafe_state_is_refused_naming_the_stage(tmp_path: Path) -> None:
    class Opaque:
        pass

    store = DirectoryStore(tmp_path)
    with pytest.raises(StateTypeError, match=r"stage 'ema'.*\['s1'\].*Opaque"):
        store.write(1, {}, {}, {"ema": {"s1": Opaque()}})
    assert store.latest() is None and not list(tmp_path.glob("ckpt-*"))


def test_a_corrupt_or_torn_checkpoint_is_skipped_for_the_previous_one(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path, keep=5)
    for n in (1, 2, 3):
        store.write(n, {}, {"s": n}, {"m": {"n": n}})
    (tmp_path / "ckpt-00000003" / "state-0.json").write_text('{"n": 99}')  # bit rot
    (tmp_path / "ckpt-00000002" / "manifest.json").unlink()  # torn: no manifest
    with capture_logs() as logs:
        back = store.latest()
    assert back is not None and back.id == 1 and back.states == {"m": {"n": 1}}
    assert [e["event"] for e in logs] == ["checkpoint.skipped", "checkpoint.skipped"]


def test_the_newest_n_are_kept_and_a_temporary_write_is_never_read(tmp_path: Path) -> None:
    store = DirectoryStore(tmp_path, keep=2)
    for n in range(1, 6):
        store.write(n, {}, {}, {"m": n})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000004", "ckpt-00000005"]
    (tmp_path / ".ckpt-00000006.tmp").mkdir()  # a crash in the middle of writing 6
    back = store.latest()
    assert back is not None and back.id == 5
