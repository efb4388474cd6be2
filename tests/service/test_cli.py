"""The ``streamflow`` command as a subprocess: run, validate, graph, plan; exit statuses."""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from .conftest import App

NEEDS_DOT = pytest.mark.skipif(
    shutil.which("dot") is None, reason="Graphviz's dot is not installed (Debian: graphviz)"
)


def test_run_a_flow_whose_sources_end_exits_0(app: App) -> None:
    done = app.cli("run", "svcapp:short", "--no-live")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "2", "4"]
    assert "flow.start" in done.stderr and "flow.stop" in done.stderr


def test_run_with_checkpoints_resumes_where_the_last_run_ended(app: App) -> None:
    where = app.path / "ckpt"
    options = ("--no-live", "--checkpoints", str(where), "--checkpoint-every", "0.5")
    done = app.cli("run", "svcapp:totals", *options)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "1", "3", "6", "10"]
    assert "checkpoint.taken" in done.stderr
    assert sorted(p.name for p in where.iterdir()) == ["ckpt-00000000", "ckpt-00000001"]

    again = app.cli("run", "svcapp:totals", *options)  # the position is at the end already
    assert again.returncode == 0, again.stderr
    assert again.stdout.split() == []
    assert "checkpoint.restored" in again.stderr

    bad = app.cli("run", "svcapp:totals", "--checkpoints", str(where), "--checkpoint-every", "0")
    assert bad.returncode == 2 and "--checkpoints: every must be" in bad.stderr


def test_run_an_async_factory_with_json_logs(app: App) -> None:
    done = app.cli("run", "svcapp:make_async", "--log-format", "json")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "2", "4"]
    events = [json.loads(line)["event"] for line in done.stderr.splitlines()]
    assert events[0] == "flow.start" and events[-1] == "flow.stop"


def test_run_a_file_path_target_with_warning_logs_only(app: App) -> None:
    done = app.cli("run", str(app.path / "svcapp.py") + ":short", "--log-level", "warning")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "2", "4"] and done.stderr == ""


def test_a_failing_stage_exits_1_naming_stage_and_item_without_traceback(app: App) -> None:
    done = app.cli("run", "svcapp:failing", "--log-level", "error")
    assert done.returncode == 1
    message = done.stderr.splitlines()[-1]
    assert message.startswith("streamflow: stage 'check' of flow 'failing' failed on item 2")
    assert "two is not allowed" in message
    assert "Traceback" not in done.stderr


def test_a_failing_stage_with_debug_logs_prints_the_traceback(app: App) -> None:
    done = app.cli("run", "svcapp:failing", "--log-level", "debug")
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "ValueError: two is not allowed" in done.stderr


@pytest.mark.parametrize(
    ("target", "said"),
    [
        ("svcapp", "expected MODULE:ATTR"),
        ("nosuchmodule:flow", "cannot import module 'nosuchmodule'"),
        (
            "svcapp:nope",
            "has no attribute 'nope' (flows there: failing, short, unfinished, totals)",
        ),
        ("svcapp:number", "svcapp:number is builtins.int 3: expected a streamflow.Flow"),
        ("svcapp:check", "svcapp:check failed"),  # called with no arguments: TypeError
    ],
)
def test_usage_errors_exit_2_saying_what_was_found(app: App, target: str, said: str) -> None:
    done = app.cli("run", target)
    expected = 1 if target == "svcapp:check" else 2  # the user's callable raised
    assert done.returncode == expected, done.stderr
    assert said in done.stderr


def test_bad_options_exit_2(app: App) -> None:
    assert app.cli("run", "svcapp:short", "--metrics", "localhost:notaport").returncode == 2
    assert app.cli("run", "svcapp:short", "--log-format", "xml").returncode == 2
    assert app.cli("frobnicate").returncode == 2


def test_validate(app: App) -> None:
    done = app.cli("validate", "svcapp:make")
    assert done.returncode == 0, done.stderr
    assert "flow 'svc'" in done.stdout and "slow" in done.stdout and "valid" in done.stdout
    done = app.cli("validate", "svcapp:unfinished")
    assert done.returncode == 1
    assert "stage 'dangling' of flow 'unfinished' has no consumer" in done.stderr


def test_graph_text_mermaid_and_dot(app: App) -> None:
    text = app.cli("graph", "svcapp:short")
    assert text.returncode == 0 and "map <lambda> capacity=16 device=cpu:0" in text.stdout
    mermaid = app.cli("graph", "svcapp:short", "--format", "mermaid")
    assert mermaid.stdout.startswith("flowchart LR")
    out = app.path / "flow.dot"
    dot = app.cli("graph", "svcapp:short", "--format", "dot", "-o", str(out))
    assert dot.returncode == 0 and dot.stdout == ""
    source = out.read_text()
    assert source.startswith('digraph "short" {')
    assert '"double\\nmap: <lambda>\\ncapacity=16 overflow=block\\ndevice=cpu:0"' in source
    assert "n0 -> n1;" in source and "n1 -> n2;" in source


PIPELINE_APP = """
import torch
import streamflow as sf

model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
pipe = sf.pipeline(model, ["cpu:0", "cpu:1"], torch.randn(1, 8), partition=[1, 2])
flow = sf.Flow("piped")
flow.source("x", [torch.randn(8)]).map("model", pipe).sink("out", print)
"""


def test_graph_dot_shows_a_pipelines_parts(app: App) -> None:
    pytest.importorskip("torch")
    (app.path / "piped.py").write_text(PIPELINE_APP)
    done = app.cli("graph", "piped:flow", "--format", "dot")
    assert done.returncode == 0, done.stderr
    assert "subgraph cluster_n1" in done.stdout
    assert "layers 0..0 on cpu:0" in done.stdout and "layers 1..2 on cpu:1" in done.stdout
    assert "n1_p0 -> n1_p1;" in done.stdout and "lhead=cluster_n1" in done.stdout


@NEEDS_DOT
@pytest.mark.parametrize(("fmt", "magic"), [("svg", b"<?xml"), ("png", b"\x89PNG")])
def test_graph_svg_and_png_with_graphviz(app: App, fmt: str, magic: bytes) -> None:
    out = app.path / f"flow.{fmt}"
    done = app.cli("graph", "svcapp:make", "--format", fmt, "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_bytes().startswith(magic)


def test_graph_svg_without_graphviz_names_the_package(app: App) -> None:
    done = app.cli("graph", "svcapp:short", "--format", "svg", PATH="/nonexistent")
    assert done.returncode == 1
    assert "package graphviz" in done.stderr


def test_plan_prints_the_table_and_saves_it(app: App) -> None:
    pytest.importorskip("torch")
    saved = app.path / "plan.json"
    done = app.cli(
        "plan", "svcapp:model", "--devices", "cpu:0,cpu:1", "--example-shape", "1,32",
        "--objective", "latency", "--save", str(saved), timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "cpu:0" in done.stdout
    from streamflow.parallel import Plan

    assert Plan.load(saved).devices
    wrong = app.cli("plan", "svcapp:short", "--devices", "cpu:0", "--example-shape", "1,32")
    assert wrong.returncode == 2 and "expected a torch.nn.Module" in wrong.stderr


def test_metrics_are_served_while_running(app: App) -> None:
    pytest.importorskip("prometheus_client")
    proc = app.start(
        sys.executable, "-m", "streamflow", "run", "svcapp:make", "--metrics", "127.0.0.1:0"
    )
    app.wait_sunk(5, proc)
    assert proc.stderr is not None
    url = None
    while url is None:
        line = proc.stderr.readline()
        assert line, "no metrics address printed"
        found = re.search(r"metrics at (http://\S+)", line)
        url = found.group(1) if found else None
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
    assert "svc" in body and "slow" in body
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_live_view_runs_when_asked(app: App) -> None:
    pytest.importorskip("rich")
    t0 = time.monotonic()
    done = app.cli("run", "svcapp:short", "--live")
    assert done.returncode == 0, done.stderr
    assert "double" in done.stdout and time.monotonic() - t0 < 60


def test_python_m_and_the_console_script_are_declared() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["streamflow"] == "streamflow._cli:main"
    script = Path(sys.executable).parent / "streamflow"
    if script.exists():  # installed (pip install -e .): the same command
        import subprocess

        done = subprocess.run([str(script), "--version"], capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.startswith("streamflow ")
