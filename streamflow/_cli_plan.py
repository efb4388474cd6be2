"""``streamflow plan MODULE:ATTR``: profile a model and print the plan a pipeline would use."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from ._cli_load import UsageError, resolve_value

__all__ = ["add_plan"]


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):
        raise argparse.ArgumentTypeError(f"expected sizes like 1,1024, got {text!r}")
    return shape


def _devices(text: str) -> list[str]:
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise argparse.ArgumentTypeError(f"expected devices like cpu:0,cpu:1, got {text!r}")
    return devices


def add_plan(commands: Any) -> None:
    parser = commands.add_parser(
        "plan",
        help="profile a model and print the layer-wise plan over devices",
        description="Profile a model layer by layer on an example batch and print the plan "
        "sf.pipeline would use over the devices (the same chooser, trial included).",
    )
    parser.add_argument(
        "target", metavar="MODULE:ATTR", help="a torch.nn.Module, or a callable returning one"
    )
    parser.add_argument(
        "--devices",
        type=_devices,
        required=True,
        metavar="DEV,DEV",
        help="for example cpu:0,cpu:1 or cuda:0,cuda:1",
    )
    parser.add_argument(
        "--example-shape",
        type=_shape,
        required=True,
        metavar="N,...",
        help="the shape of one batch, filled with random floats (e.g. 1,1024)",
    )
    parser.add_argument("--objective", choices=("throughput", "latency"), default="throughput")
    parser.add_argument(
        "--save", metavar="FILE", help="write the plan as JSON (Plan.load reads it)"
    )
    parser.set_defaults(command=plan_command)


def plan_command(args: argparse.Namespace) -> int:
    try:
        import torch
    except ImportError:
        raise UsageError("plan needs torch: pip install 'streamflow[torch]'") from None
    from .parallel import pipeline

    model = asyncio.run(resolve_value(args.target, torch.nn.Module, "a torch.nn.Module"))
    example = torch.randn(*args.example_shape)
    try:
        pipe = pipeline(model, args.devices, example, objective=args.objective)
    except (ValueError, TypeError, RuntimeError) as exc:
        print(f"streamflow plan: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(pipe.plan.table())
    if args.save:
        pipe.plan.save(args.save)
        print(f"saved to {args.save}")
    return 0
