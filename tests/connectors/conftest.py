"""Real brokers for the connector tests: start them once per session if they don't answer.

``.ci/brokers.sh start`` reuses brokers that already run. Nothing is skipped: the Kafka and
MQTT tests need the brokers, and fail if they cannot be started.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KAFKA_PORT = int(os.environ.get("KAFKA_PORT", "9092"))
MQTT_PORT = int(os.environ.get("MQTT_PORT", "1883"))


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def project_tls(broker: str, port: int) -> Path:
    """The test CA of the TLS listener on ``port`` that ``.ci/<broker>.sh`` made; skips the
    test when the running broker is not the project's (no such listener, or no CA)."""
    brokers_dir = Path(os.environ.get("STREAMFLOW_BROKERS_DIR", ROOT / ".brokers"))
    ca = brokers_dir / broker / "tls" / "ca.pem"
    if not (answers(port) and ca.exists()):
        pytest.skip(f"the running {broker} has no TLS listener on {port} (not .ci/{broker}.sh's)")
    return ca


def broker_script(name: str, command: str) -> None:
    """Run ``.ci/<name>.sh <command>`` (fails the test with the script's output)."""
    result = subprocess.run(
        [str(ROOT / ".ci" / f"{name}.sh"), command],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f".ci/{name}.sh {command} failed:\n{result.stdout}\n{result.stderr}")


@pytest.fixture(scope="session")
def brokers() -> Iterator[None]:
    """Kafka on 127.0.0.1:KAFKA_PORT and mosquitto on 127.0.0.1:MQTT_PORT, running."""
    if not (answers(KAFKA_PORT) and answers(MQTT_PORT)):
        broker_script("brokers", "start")
    yield


@pytest.fixture
def kafka(brokers: None) -> str:
    """The bootstrap address of the test Kafka."""
    if not answers(KAFKA_PORT):  # a test before this one may have restarted it
        broker_script("kafka", "start")
    return f"127.0.0.1:{KAFKA_PORT}"


@pytest.fixture
def mqtt_port(brokers: None) -> int:
    """The port of the test mosquitto on 127.0.0.1."""
    if not answers(MQTT_PORT):
        broker_script("mosquitto", "start")
    return MQTT_PORT


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    """A unique topic / group name for this test."""
    return f"{request.node.name[:40].replace('[', '-').strip(']')}-{uuid.uuid4().hex[:8]}"
