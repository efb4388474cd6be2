"""Split a model into an ordered list of layers that can be cut between.

A *layer* here is the smallest unit the partitioner may place on a device: running the
layers one after another on a single tensor equals the model's forward, and each hand-off
between two consecutive layers is exactly one tensor.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import Argument, map_arg

__all__ = ["named_layers", "preserved_buffers", "split_layers"]

_HINT = "wrap it as nn.Sequential or pass a list of modules"

# Values that are metadata about a tensor, never a tensor themselves: never cut after them.
_META_METHODS = frozenset(
    {
        "size",
        "dim",
        "ndimension",
        "numel",
        "nelement",
        "stride",
        "item",
        "tolist",
        "is_contiguous",
        "is_floating_point",
        "element_size",
    }
)
_META_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"})


def split_layers(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    """Return the layers of ``model`` in execution order (see :func:`named_layers`)."""
    return [layer for _, layer in named_layers(model)]


def named_layers(
    model: nn.Module | Sequence[nn.Module], example: torch.Tensor | None = None
) -> list[tuple[str, nn.Module]]:
    """Return ``(name, layer)`` pairs whose sequential composition equals ``model``.

    Accepts an ``nn.Sequential`` (nested Sequentials are flattened to their leaf children,
    named by dotted path such as ``"1.0"``), a list/tuple of modules (flattened the same
    way, named by index), or any single-input ``nn.Module`` that ``torch.fx.symbolic_trace``
    can trace. A traced graph is cut only where exactly one tensor is live; nodes between
    such cuts (for example a residual block) become one ``fx.GraphModule`` layer named after
    its fx node or its enclosing submodule. Layers share parameters with ``model``.
    ``example`` (optional) is run through a traced graph to verify that every cut carries a
    tensor. Raises ``TypeError``/``ValueError`` for anything that cannot be split.
    """
    if isinstance(model, (list, tuple)):
        if not model:
            raise ValueError("cannot split an empty list of modules; pass at least one module")
        pairs: list[tuple[str, nn.Module]] = []
        for i, item in enumerate(model):
            if not isinstance(item, nn.Module):
                raise TypeError(
                    f"item {i} of the module list is {type(item).__name__}, not an nn.Module; "
                    "pass a list of nn.Module objects"
                )
            pairs.extend(_flatten(item, str(i)))
        return pairs
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"cannot split a {type(model).__name__}: expected an nn.Module, "
            "an nn.Sequential or a list of modules"
        )
    if _is_plain_sequential(model):
        pairs = _flatten(model, "")
        if not pairs:
            raise ValueError("cannot split an empty nn.Sequential: it has no layers")
        return pairs
    if isinstance(model, (nn.ModuleList, nn.ModuleDict)):
        raise TypeError(
            f"{type(model).__name__} has no forward; if its modules run one after another, "
            "pass list(...) of them or wrap them as nn.Sequential"
        )
    return _split_traced(model, example)


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _flatten(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    if not _is_plain_sequential(module):
        return [(prefix or "0", module)]
    pairs: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        pairs.extend(_flatten(child, f"{prefix}.{name}" if prefix else name))
    return pairs


def _trace(model: nn.Module) -> fx.GraphModule:
    """Trace ``model`` with its optional arguments fixed to their defaults."""
    concrete: dict[str, Any] = {}
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    required = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if len(required) > 1:
        raise ValueError(
            f"{type(model).__name__}.forward takes {len(required)} inputs ({', '.join(required)}); "
            f"only single-tensor-input models can be split: {_HINT}"
        )
    for p in params[1:]:
        if p.default is not inspect.Parameter.empty:
            concrete[p.name] = p.default
    try:
        gm = fx.symbolic_trace(model, concrete_args=concrete or None)
    except Exception as exc:
        raise TypeError(
            f"cannot split {type(model).__name__}: torch.fx could not trace it "
            f"({type(exc).__name__}: {exc}); {_HINT}"
        ) from exc
    graph = gm.graph
    for node in list(graph.nodes):  # drop checks that fixed optional arguments to None
        if node.op == "call_function" and getattr(node.target, "__name__", "") == "_assert_is_none":
            graph.erase_node(node)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node in placeholders[1:]:
        if node.users:
            raise ValueError(
                f"{type(model).__name__}.forward uses its extra input {node.target!r}; "
                f"only single-tensor-input models can be split: {_HINT}"
            )
        graph.erase_node(node)
    if not placeholders:
        raise ValueError(f"{type(model).__name__}.forward takes no input; nothing to split")
    gm.recompile()
    return gm


def _tensor_flags(gm: fx.GraphModule, example: torch.Tensor | None) -> dict[fx.Node, bool]:
    """Whether each node produces a tensor: run ``example`` if given, else a static guess."""
    flags: dict[fx.Node, bool] = {}
    if example is not None:

        class _Recorder(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                result = super().run_node(n)
                flags[n] = isinstance(result, torch.Tensor)
                return result

        with torch.no_grad(), preserved_buffers([gm]):
            _Recorder(gm).run(example)
        return flags
    for n in gm.graph.nodes:
        meta = (n.op == "call_method" and n.target in _META_METHODS) or (
            n.op == "call_function"
            and n.target is getattr
            and len(n.args) > 1
            and n.args[1] in _META_ATTRS
        )
        if n.op == "call_function" and getattr(n.target, "__module__", None) == "_operator":
            inputs = n.all_input_nodes
            meta = meta or (bool(inputs) and all(not flags.get(i, True) for i in inputs))
        if n.op == "call_function" and n.target in (len, operator.getitem) and n.args:
            first = n.args[0]
            meta = meta or (isinstance(first, fx.Node) and not flags.get(first, True))
        flags[n] = not meta
    return flags


@contextmanager
def preserved_buffers(modules: Sequence[object]) -> Iterator[None]:
    """Restore every buffer (e.g. BatchNorm running statistics) of ``modules`` on exit."""
    buffers = {id(b): b for m in modules if isinstance(m, nn.Module) for b in m.buffers()}
    saved = [(b, b.detach().clone()) for b in buffers.values()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _split_traced(model: nn.Module, example: torch.Tensor | None) -> list[tuple[str, nn.Module]]:
    gm = _trace(model)
    nodes = list(gm.graph.nodes)
    source = nodes[0]
    output = nodes[-1]
    compute = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")]
    if not compute:
        return [(type(model).__name__, gm)]
    flags = _tensor_flags(gm, example)
    position = {n: i for i, n in enumerate(compute)}
    position[source] = -1
    last_use: dict[fx.Node, int] = {}
    for value in [source, *compute]:
        uses = [len(compute) if u.op == "output" else position.get(u, -1) for u in value.users]
        last_use[value] = max(uses, default=-1)

    # A cut after compute[p] is valid when exactly one live value crosses it, and it is a tensor.
    expiring: dict[int, list[fx.Node]] = {}
    for value, last in last_use.items():
        expiring.setdefault(last, []).append(value)
    live = {source} if last_use[source] >= 0 else set()
    cuts: list[tuple[int, fx.Node]] = []
    for p, node in enumerate(compute[:-1]):
        if last_use[node] > p:
            live.add(node)
        live.difference_update(expiring.get(p, ()))
        if len(live) == 1 and flags.get(next(iter(live)), True):
            cuts.append((p + 1, next(iter(live))))

    pairs: list[tuple[str, nn.Module]] = []
    used: set[str] = set()
    carried, start = source, 0
    for end, live_value in [*cuts, (len(compute), None)]:
        segment = compute[start:end]
        result: Argument = output.args[0] if live_value is None else live_value
        pairs.append((_segment_name(segment, used), _build(gm, carried, segment, result)))
        if live_value is not None:
            carried, start = live_value, end
    return pairs


def _build(
    gm: fx.GraphModule, carried: fx.Node, segment: list[fx.Node], result: Argument
) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {carried: graph.placeholder(carried.name)}

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            if n.op != "get_attr":
                raise ValueError(f"internal error: {n.name} is not available in this segment")
            env[n] = graph.node_copy(n, lookup)
        return env[n]

    for n in segment:
        env[n] = graph.node_copy(n, lookup)
    graph.output(map_arg(result, lookup))
    return fx.GraphModule(gm, graph, class_name="Segment")


def _segment_name(segment: list[fx.Node], used: set[str]) -> str:
    """Name a segment after its node, or the innermost submodule enclosing all its nodes."""
    name = segment[0].name
    if len(segment) > 1:
        paths = [[str(v[0]) for v in n.meta.get("nn_module_stack", {}).values()] for n in segment]
        common = paths[0]
        for path in paths[1:]:
            k = 0
            while k < min(len(common), len(path)) and common[k] == path[k]:
                k += 1
            common = common[:k]
        span = f"{segment[0].name}..{segment[-1].name}"
        name = common[-1] if common and common[-1] not in used else span
    base, k = name, 1
    while name in used:
        k += 1
        name = f"{base}#{k}"
    used.add(name)
    return name
