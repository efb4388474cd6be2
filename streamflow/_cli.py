"""The ``streamflow`` command (also ``python -m streamflow``): run, validate, graph, plan.

Exit status: 0 when the sources ended or a signal stopped the flow and it drained; 1 when a
stage failed (or the user's code raised); 2 for usage errors; 130 (SIGINT) or 143 (SIGTERM)
when a second signal or the drain timeout stopped it at once.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from ._cli_graph import add_graph, add_validate
from ._cli_load import TargetError, UsageError
from ._cli_plan import add_plan
from ._cli_run import add_run

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    from . import __version__

    top = argparse.ArgumentParser(
        prog="streamflow",
        description="Run, check and draw streamflow flows. MODULE:ATTR names a Flow (or a "
        "callable returning one) as `app:flow`, importing app from the current directory; "
        "MODULE may also be a file path (`path/to/app.py:flow`).",
    )
    top.add_argument("--version", action="version", version=f"streamflow {__version__}")
    commands = top.add_subparsers(title="commands", metavar="COMMAND", required=True)
    add_run(commands)
    add_validate(commands)
    add_graph(commands)
    add_plan(commands)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); the exit status."""
    args = parser().parse_args(argv)
    try:
        status: int = args.command(args)
    except UsageError as exc:
        print(f"streamflow: {exc}", file=sys.stderr)
        return 2
    except TargetError as exc:
        print(f"streamflow: {exc}", file=sys.stderr)
        if exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return status
