"""Instructions per item, counted by valgrind: paired comparisons a drifting machine cannot blur.

This VM's speed drifts by 10% and more for minutes at a time, so a timed benchmark needs
many interleaved rounds to show a change of a few percent. The number of instructions a
run executes does not drift (it varies by about 0.1% between runs), so it compares two
versions of the code, or two contenders, in one go. It leaves out what instructions do
not show (cache misses, system calls: epoll costs the same to every contender of a hop),
so it complements the timed benchmarks and does not replace them.

Each contender runs in its own process under ``valgrind --tool=callgrind`` twice, at N
and 2N items; the difference over N is its instructions per item, without the start-up.
Two processes run at once (the count does not depend on the load). Suites:

- ``hop``: the chains of ``benchmarks/hop.py`` (asyncio.Queue, streamflow ``async def``
  and ``def``), queued (N items) and trickled (N/10), 4 maps; and 8 maps queued, for one
  more map stage;
- ``windows``: the contenders of ``benchmarks/windows.py`` (hand loop, streamflow
  aggregate and items), less the instructions that make the readings.

Needs valgrind (``apt-get install valgrind``). Run:
    .venv/bin/python benchmarks/instructions.py [hop|windows] [--items N]
With ``PYTHONPATH=/another/checkout`` the children import that checkout's streamflow,
so two versions can be compared side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import table

HERE = Path(__file__).resolve().parent
COLLECTED = re.compile(rb"Collected : (\d+)")

HOP = ("asyncio.Queue(16)", "streamflow (async def)", "streamflow (def)")
TRICKLE_SHARE = 10  # trickled items cost about five times as many instructions
WINDOWS = ("hand loop", "streamflow aggregate", "streamflow items", "readings only")


def child(suite: str, name: str, mode: str, n: int) -> None:
    """Run one contender once (the process valgrind counts)."""
    sys.path.insert(0, str(HERE))
    import streamflow as sf

    sf.configure_logging(level="warning")
    if suite == "hop":
        import hop

        hops, trickle = (8 if mode == "queued8" else 4), mode == "trickle"
        if name == "asyncio.Queue(16)":
            asyncio.run(hop.queue_chain(n, trickle, hops=hops))
        else:
            asyncio.run(hop.streamflow_chain(n, trickle, plain=name.endswith("(def)"), hops=hops))
        return
    import windows

    readings = windows.make_readings(n)
    if name == "hand loop":
        windows.hand_loop(readings, [].append)
    elif name.startswith("streamflow"):
        asyncio.run(windows.streamflow_run(name == "streamflow aggregate")(readings))


def count(suite: str, name: str, mode: str, n: int) -> int:
    """Instructions of one child run."""
    cmd = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--child",
        suite,
        name,
        mode,
        str(n),
    ]
    out = subprocess.run(cmd, capture_output=True, check=True, env=os.environ).stderr
    found = COLLECTED.search(out)
    if found is None:
        raise RuntimeError(f"valgrind gave no count for {name} {mode}: {out[-500:]!r}")
    return int(found.group(1))


def per_item(jobs: list[tuple[str, str, str, int]]) -> dict[tuple[str, str], float]:
    """Instructions per item of each ``(suite, name, mode, n)``, from runs at n and 2n."""
    runs = [(job, size) for job in jobs for size in (job[3], 2 * job[3])]
    with ThreadPoolExecutor(2) as pool:  # two valgrinds at once: one per core
        counts = list(pool.map(lambda r: count(*r[0][:3], r[1]), runs))
    by_run = dict(zip(runs, counts, strict=True))
    return {
        (job[1], job[2]): (by_run[job, 2 * job[3]] - by_run[job, job[3]]) / job[3] for job in jobs
    }


def hop_suite(n: int) -> None:
    sizes = {"queued": n, "trickle": n // TRICKLE_SHARE, "queued8": n}
    got = per_item([("hop", name, mode, sizes[mode]) for mode in sizes for name in HOP])
    rows = [
        (name, mode, f"{got[name, mode] / 5:,.0f}", got[name, mode] / got[HOP[0], mode])
        for mode in ("queued", "trickle")
        for name in HOP
    ]
    print(
        f"{n:,} and {2 * n:,} items queued, a tenth of that trickled, 4 map stages (5 hops); "
        "instructions per item per hop"
    )
    print(table(["chain", "items", "instructions/item/hop", "x asyncio.Queue"], rows))
    base = (got["asyncio.Queue(16)", "queued8"] - got["asyncio.Queue(16)", "queued"]) / 4
    rows = []
    for name in HOP:
        added = (got[name, "queued8"] - got[name, "queued"]) / 4
        rows.append((name, f"{added:,.0f}", added / base))
    print("\none more map stage, queued (chains of 4 and 8 maps):")
    print(table(["chain", "instructions/item/added hop", "x asyncio.Queue"], rows))


def windows_suite(n: int) -> None:
    got = per_item([("windows", name, "run", n) for name in WINDOWS])
    readings = got["readings only", "run"]
    net = {name: got[name, "run"] - readings for name in WINDOWS[:-1]}
    hand = net["hand loop"]
    rows = [(name, f"{net[name]:,.0f}", hand / net[name]) for name in net]
    print(f"{n:,} and {2 * n:,} readings (benchmarks/windows.py's job), less making them")
    print(table(["contender", "instructions/reading", "x hand loop (speed)"], rows))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        suite, name, mode, n = sys.argv[2:6]
        child(suite, name, mode, int(n))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("suite", nargs="?", choices=("hop", "windows"), default="hop")
    parser.add_argument("--items", type=int, default=None, help="N (default 20,000)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    (hop_suite if args.suite == "hop" else windows_suite)(args.items or 20_000)


if __name__ == "__main__":
    main()
