"""``streamflow run MODULE:ATTR``: run a flow as a service until its sources end or a signal
stops it, with a Prometheus endpoint and a live view if asked."""

from __future__ import annotations

import argparse
import asyncio
import sys
import traceback
from contextlib import AsyncExitStack
from typing import Any

from ._checkpoints import Checkpoints
from ._cli_load import TargetError, UsageError, resolve_flow
from ._errors import GraphError, StageError
from ._logging import configure_logging
from ._signals import Interrupted

__all__ = ["add_run", "parse_address"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` or ``PORT`` (loopback when no host)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (for example :9464), got {text!r}")
    return host, number


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=("console", "json"),
        default="console",
        help="log lines on stderr as key=value text or JSON (default: console)",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="info",
        help="the lowest level logged (default: info); debug also prints tracebacks",
    )


def add_run(commands: Any) -> None:
    parser = commands.add_parser(
        "run",
        help="run a flow until its sources end or SIGINT/SIGTERM stops it",
        description="Run a flow. The first SIGINT or SIGTERM stops the sources and drains "
        "the flow (exit 0); a second one, or --drain-timeout, stops it at once (exit 130 "
        "for SIGINT, 143 for SIGTERM). A stage failing exits 1, a usage error 2.",
    )
    parser.add_argument(
        "target",
        metavar="MODULE:ATTR",
        help="a streamflow.Flow, or a sync or async callable returning one",
    )
    add_logging_options(parser)
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="after the first signal, how long the drain may take (default 30)",
    )
    parser.add_argument(
        "--metrics",
        type=parse_address,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics "
        "(loopback unless a host is given)",
    )
    parser.add_argument(
        "--checkpoints",
        metavar="DIR",
        help="checkpoint the flow into DIR and restore the newest checkpoint there on start "
        "(overrides the flow's own checkpoints=; see docs/RECOVERY.md)",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="with --checkpoints: seconds between checkpoints (default 5)",
    )
    parser.add_argument(
        "--checkpoint-keep",
        type=int,
        default=3,
        metavar="N",
        help="with --checkpoints: how many checkpoints to keep (default 3)",
    )
    parser.add_argument(
        "--live",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a live view of the stages in the terminal (default: on when stdout is a terminal)",
    )
    parser.set_defaults(command=run_command)


def configure(args: argparse.Namespace) -> None:
    configure_logging(json=args.log_format == "json", level=args.log_level)


def fail(message: str, args: argparse.Namespace, exc: BaseException | None = None) -> None:
    """One paragraph on stderr; the traceback too with ``--log-level debug``."""
    print(f"streamflow: {message}", file=sys.stderr)
    if exc is not None and getattr(args, "log_level", "info") == "debug":
        traceback.print_exception(exc, file=sys.stderr)


def run_command(args: argparse.Namespace) -> int:
    configure(args)
    if args.drain_timeout < 0:
        print("streamflow run: --drain-timeout must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_run(args))
    except UsageError as exc:
        print(f"streamflow run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TargetError as exc:
        fail(str(exc), args, exc.__cause__)
        if args.log_level != "debug" and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__, file=sys.stderr)  # the user's own code
        return EXIT_FAILED
    except StageError as exc:
        also = f" ({len(exc.also)} more stages failed while it stopped)" if exc.also else ""
        fail(f"{exc}{also}", args, exc)
        return EXIT_FAILED
    except GraphError as exc:
        fail(f"the flow is not valid: {exc}", args, exc)
        return EXIT_FAILED
    except Interrupted as exc:
        fail(f"{exc}", args)
        return exc.exit_code


async def _run(args: argparse.Namespace) -> int:
    flow = await resolve_flow(args.target)
    if args.checkpoints is not None:
        try:
            flow.checkpoints = Checkpoints(
                args.checkpoints, every=args.checkpoint_every, keep=args.checkpoint_keep
            )
        except ValueError as exc:
            raise UsageError(f"--checkpoints: {exc}") from None
    live = sys.stdout.isatty() if args.live is None else args.live
    serve_metrics: Any = None
    live_view: Any = None
    if args.metrics is not None:
        serve_metrics = _optional("_prometheus", "serve_metrics", "--metrics", "prometheus-client")
    if live:
        live_view = _optional("_live", "LiveView", "--live", "rich")
    async with AsyncExitStack() as stack:
        running = await stack.enter_async_context(flow.start())
        if serve_metrics is not None:
            host, port = args.metrics
            try:
                server = await stack.enter_async_context(serve_metrics(running, host, port))
            except OSError as exc:
                raise UsageError(f"--metrics {host}:{port}: cannot listen there: {exc}") from None
            print(f"streamflow: metrics at {server.url}", file=sys.stderr)
        if live_view is not None:
            await stack.enter_async_context(live_view(running))
        await running.wait(stop_on_signals=True, drain_timeout=args.drain_timeout)
    return EXIT_OK


def _optional(module: str, name: str, option: str, package: str) -> Any:
    """``streamflow.<module>.<name>``, imported only when its option is used."""
    import importlib

    try:
        return getattr(importlib.import_module(f"streamflow.{module}"), name)
    except (ImportError, AttributeError) as exc:
        raise UsageError(
            f"{option} is not available: {exc} (it needs the {package} package: "
            f"pip install {package})"
        ) from None
