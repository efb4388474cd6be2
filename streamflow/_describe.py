"""Render a flow's spec as text and as a Mermaid diagram."""

from __future__ import annotations

from dataclasses import dataclass

from ._spec import FlowSpec

__all__ = ["FlowDescription"]


@dataclass(frozen=True, slots=True)
class FlowDescription:
    """A flow's graph: ``str(d)`` / ``d.text`` for people, ``d.mermaid`` for diagrams.

    Each stage's line names its loop strategy (``loop=inline``, ``loop=worker``, ...; see
    :data:`streamflow.LOOPS`), so you can see which path a stage takes.
    """

    text: str
    mermaid: str

    def __str__(self) -> str:
        return self.text


def describe(spec: FlowSpec) -> FlowDescription:
    stages = spec.stages
    lines = [f"flow {spec.name!r}"]
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
    return FlowDescription("\n".join(lines), "\n".join(chart))
