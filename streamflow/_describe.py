"""Render a flow graph as text and as a Mermaid diagram."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._graph import _Node

__all__ = ["FlowDescription"]


@dataclass(frozen=True, slots=True)
class FlowDescription:
    """A flow's graph: ``str(d)`` / ``d.text`` for people, ``d.mermaid`` for diagrams."""

    text: str
    mermaid: str

    def __str__(self) -> str:
        return self.text


def describe(flow: str, nodes: list[_Node]) -> FlowDescription:
    lines = [f"flow {flow!r}"]
    width = max((len(n.name) for n in nodes), default=0)
    for node in nodes:
        details: list[str] = [node.kind]
        if node.label():
            details.append(node.label())
        if node.kind not in ("source", "merge"):
            details.append(f"capacity={node.capacity}")
            if node.overflow != "block":
                details.append(f"overflow={node.overflow}")
        if node.device is not None:
            details.append(f"device={node.device}")
        if node.concurrency > 1:
            details.append(
                f"concurrency={node.concurrency}" + ("" if node.ordered else " unordered")
            )
        if node.errors != "fail":
            details.append(f"errors={node.errors!r}")
        if node.kind == "batch":
            details.append(
                f"max_size={node.options['max_size']} max_wait={node.options['max_wait']}"
            )
        out = ", ".join(c.name for c in node.consumers) or "-"
        lines.append(f"  {node.name:<{width}}  {' '.join(details)}  -> {out}")

    ids = {node.name: f"n{i}" for i, node in enumerate(nodes)}
    chart = ["flowchart LR"]
    for node in nodes:
        label = f"{node.name}<br/>{node.kind}" + (f" @ {node.device}" if node.device else "")
        label = label.replace('"', "'")
        shape = {
            "source": ('[/"', '"/]'),
            "sink": ('[\\"', '"\\]'),
            "merge": ('(("', '"))'),
        }.get(node.kind, ('["', '"]'))
        chart.append(f"    {ids[node.name]}{shape[0]}{label}{shape[1]}")
    chart.extend(
        f"    {ids[node.name]} --> {ids[consumer.name]}"
        for node in nodes
        for consumer in node.consumers
    )
    return FlowDescription("\n".join(lines), "\n".join(chart))
