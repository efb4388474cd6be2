"""``streamflow validate`` and ``streamflow graph``: a flow's graph, checked or drawn."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._cli_load import resolve_flow
from ._errors import GraphError

__all__ = ["add_graph", "add_validate"]

FORMATS = ("text", "mermaid", "dot", "svg", "png")
GRAPHVIZ_MISSING = (
    "rendering {fmt} needs Graphviz's `dot`, which is not installed: install the Debian "
    "package graphviz (sudo apt-get install graphviz), or use --format dot"
)


def add_validate(commands: Any) -> None:
    parser = commands.add_parser(
        "validate",
        help="build and validate a flow, print its graph (exit 0, or 1 with the error)",
    )
    parser.add_argument("target", metavar="MODULE:ATTR", help="a Flow or a callable returning one")
    parser.set_defaults(command=validate_command)


def add_graph(commands: Any) -> None:
    parser = commands.add_parser(
        "graph",
        help="draw a flow's graph as text, Mermaid, DOT, SVG or PNG",
        description="Draw a flow's graph. Stages show their kind, device, capacity and "
        "overflow; pipelines and trainers show their parts. svg and png need Graphviz's dot.",
    )
    parser.add_argument("target", metavar="MODULE:ATTR", help="a Flow or a callable returning one")
    parser.add_argument("--format", choices=FORMATS, default="text", help="default: text")
    parser.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    parser.set_defaults(command=graph_command)


def validate_command(args: argparse.Namespace) -> int:
    flow = asyncio.run(resolve_flow(args.target))
    try:
        flow.spec()
    except GraphError as exc:
        print(f"streamflow validate: invalid flow: {exc}", file=sys.stderr)
        return 1
    print(flow.describe().text)
    print("valid")
    return 0


def graph_command(args: argparse.Namespace) -> int:
    flow = asyncio.run(resolve_flow(args.target))
    described = flow.describe()
    data: bytes
    if args.format == "text":
        data = (described.text + "\n").encode()
    elif args.format == "mermaid":
        data = (described.mermaid + "\n").encode()
    elif args.format == "dot":
        data = described.dot.encode()
    else:
        dot = shutil.which("dot")
        if dot is None:
            print(f"streamflow graph: {GRAPHVIZ_MISSING.format(fmt=args.format)}", file=sys.stderr)
            return 1
        done = subprocess.run(
            [dot, f"-T{args.format}"],
            input=described.dot.encode(),
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            error = done.stderr.decode(errors="replace").strip()
            print(f"streamflow graph: dot failed: {error}", file=sys.stderr)
            return 1
        data = done.stdout
    if args.output:
        Path(args.output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    return 0
