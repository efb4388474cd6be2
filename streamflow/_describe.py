"""Render a flow's spec as text, as a Mermaid diagram and as Graphviz DOT."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from ._checkpoints import participant_of
from ._io import iterate
from ._spec import FlowSpec, StageSpec

__all__ = ["FlowDescription", "to_dot"]


@dataclass(frozen=True, slots=True)
class FlowDescription:
    """A flow's graph: ``str(d)`` / ``d.text`` for people, ``d.mermaid`` for diagrams,
    ``d.dot`` for Graphviz (``dot -Tsvg``; pipelines and trainers drawn with their parts).

    Each stage's line names its loop strategy (``loop=inline``, ``loop=worker``, ...; see
    :data:`streamflow.LOOPS`), so you can see which path a stage takes. With checkpoints,
    each source says whether its position is checkpointed (``position=checkpointed``) or
    it cannot seek (``position=none``: after a crash it goes on from what its broker
    still has), and each stage that keeps state says ``state=checkpointed``.
    """

    text: str
    mermaid: str
    dot: str = ""

    def __str__(self) -> str:
        return self.text


def describe(spec: FlowSpec) -> FlowDescription:
    stages = spec.stages
    lines = [f"flow {spec.name!r}"]
    if spec.checkpoints is not None:
        lines[0] += f" {spec.checkpoints!r}"
    width = max((len(s.name) for s in stages), default=0)
    for stage in stages:
        details: list[str] = [stage.kind]
        if stage.label:
            details.append(stage.label)
        if stage.has_inbox:
            details.append(f"capacity={stage.capacity}")
            if stage.overflow != "block":
                details.append(f"overflow={stage.overflow}")
        if stage.device is not None:
            details.append(f"device={stage.device}")
        if stage.concurrency > 1:
            details.append(
                f"concurrency={stage.concurrency}" + ("" if stage.ordered else " unordered")
            )
        if stage.errors != "fail":
            details.append(f"errors={stage.errors!r}")
        if stage.kind == "batch" and stage.options is not None:
            details.append(
                f"max_size={stage.options['max_size']} max_wait={stage.options['max_wait']}"
            )
        if stage.kind != "merge":
            details.append(f"loop={stage.loop}")
        if spec.checkpoints is not None:
            details.extend(_checkpointed(stage))
        out = ", ".join(stage.consumers) or "-"
        lines.append(f"  {stage.name:<{width}}  {' '.join(details)}  -> {out}")

    ids = {stage.name: f"n{i}" for i, stage in enumerate(stages)}
    chart = ["flowchart LR"]
    for stage in stages:
        label = f"{stage.name}<br/>{stage.kind}" + (f" @ {stage.device}" if stage.device else "")
        label = label.replace('"', "'")
        shape = {
            "source": ('[/"', '"/]'),
            "sink": ('[\\"', '"\\]'),
            "merge": ('(("', '"))'),
        }.get(stage.kind, ('["', '"]'))
        chart.append(f"    {ids[stage.name]}{shape[0]}{label}{shape[1]}")
    chart.extend(
        f"    {ids[stage.name]} --> {ids[consumer]}"
        for stage in stages
        for consumer in stage.consumers
    )
    return FlowDescription("\n".join(lines), "\n".join(chart), to_dot(spec))


def _checkpointed(stage: StageSpec) -> list[str]:
    if stage.kind == "source":
        seeks = isinstance(stage.fn, iterate) or participant_of(stage.fn) is not None
        return ["position=checkpointed" if seeks else "position=none"]
    if stage.kind == "window" or participant_of(stage.fn) is not None:
        return ["state=checkpointed"]
    return []


_DOT_SHAPES = {"source": "invhouse", "sink": "house", "merge": "circle"}


def _quote(text: str) -> str:
    """A DOT string: quotes and backslashes escaped, lines joined with ``\\n``."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n") + '"'


def _parts(stage: StageSpec) -> list[Any]:
    """The parts of a pipeline's or a trainer's stage (each with ``span()``), else ``[]``."""
    parts = getattr(stage.fn, "parts", None)
    if not isinstance(parts, list | tuple) or not all(hasattr(p, "span") for p in parts):
        return []
    return list(parts)


def _dot_details(stage: StageSpec) -> list[str]:
    lines = [stage.name, stage.kind if not stage.label else f"{stage.kind}: {stage.label}"]
    if _parts(stage):
        lines[1] = f"{stage.kind}: {getattr(stage.fn, 'title', 'parts')}"
    if stage.has_inbox:
        lines.append(f"capacity={stage.capacity} overflow={stage.overflow}")
    extra = []
    if stage.device is not None:
        extra.append(f"device={stage.device}")
    if stage.concurrency > 1:
        extra.append(f"concurrency={stage.concurrency}" + ("" if stage.ordered else " unordered"))
    if stage.errors != "fail":
        extra.append(f"errors={stage.errors!r}")
    if extra:
        lines.append(" ".join(extra))
    return lines


def to_dot(spec: FlowSpec) -> str:
    """The flow as a Graphviz digraph: each stage a node with its kind, what it runs, its
    inbox's capacity and overflow and its device; a pipeline's or trainer's stage a cluster
    of its parts (layers and device each)."""
    ids = {stage.name: f"n{i}" for i, stage in enumerate(spec.stages)}
    heads: dict[str, tuple[str, str]] = {}  # a cluster's first and last part
    out = [
        f"digraph {_quote(spec.name)} {{",
        "    rankdir=LR;",
        "    compound=true;",
        f"    label={_quote(f'flow {spec.name}')};",
        '    node [shape=box, style=rounded, fontname="Helvetica", fontsize=10];',
        '    edge [fontname="Helvetica", fontsize=9];',
    ]
    for stage in spec.stages:
        node = ids[stage.name]
        label = _quote("\n".join(_dot_details(stage)))
        parts = _parts(stage)
        if not parts:
            shape = _DOT_SHAPES.get(stage.kind)
            attrs = f"label={label}" + (f", shape={shape}, style=solid" if shape else "")
            out.append(f"    {node} [{attrs}];")
            continue
        out.append(f"    subgraph cluster_{node} {{")
        out.append(f"        label={label};")
        out.append("        style=dashed;")
        names = [f"{node}_p{i}" for i in range(len(parts))]
        for i, (name, part) in enumerate(zip(names, parts, strict=True)):
            part_label = _quote(f"part {i}" + "\n" + part.span())
            out.append(f"        {name} [label={part_label}];")
        out.extend(f"        {a} -> {b};" for a, b in itertools.pairwise(names))
        out.append("    }")
        heads[stage.name] = (names[0], names[-1])
    for stage in spec.stages:
        for consumer in stage.consumers:
            src, dst = ids[stage.name], ids[consumer]
            ends: list[str] = []
            if stage.name in heads:
                src = heads[stage.name][1]
                ends.append(f"ltail=cluster_{ids[stage.name]}")
            if consumer in heads:
                dst = heads[consumer][0]
                ends.append(f"lhead=cluster_{ids[consumer]}")
            suffix = f" [{', '.join(ends)}]" if ends else ""
            out.append(f"    {src} -> {dst}{suffix};")
    out.append("}")
    return "\n".join(out) + "\n"
