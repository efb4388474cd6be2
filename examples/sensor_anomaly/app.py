"""The flow: sensor readings over MQTT, windowed with ``batch``, scored by an autoencoder
pinned to ``cpu:0``, anomalies written to a Kafka topic.

    MqttSource("{prefix}/+/reading")   QoS 1: a reading is acked once its window is done
      -> decode (JSON; malformed readings are skipped and logged)
      -> window: batch(32 readings or 0.2 s)
      -> score: autoencoder on device "cpu:0" (a dedicated worker thread)
      -> anomalies: keep readings whose reconstruction error is above the threshold
      -> KafkaSink(topic): acks=all, keyed by sensor
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from streamflow.connectors.kafka import KafkaSink
from streamflow.connectors.mqtt import MqttSource

import streamflow as sf
from streamflow import connectors

from .model import AutoEncoder, train


@dataclass
class Settings:
    prefix: str = "sensors"
    topic: str = "anomalies"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    kafka: str = "127.0.0.1:9092"
    window: int = 32
    window_wait: float = 0.2


class Scorer(sf.Stage[list[dict[str, Any]], list[dict[str, Any]]]):
    """Scores a window of readings at once; trains its model in ``setup`` (on cpu:0)."""

    def __init__(self) -> None:
        self.model: AutoEncoder | None = None
        self.threshold = 0.0

    def setup(self) -> None:
        self.model, self.threshold = train()

    def process(self, window: list[dict[str, Any]]) -> list[dict[str, Any]]:
        assert self.model is not None
        scores = self.model.score(torch.tensor([r["values"] for r in window]))
        return [
            {"sensor": r["sensor"], "seq": r["seq"], "score": round(float(s), 4)}
            for r, s in zip(window, scores, strict=True)
            if s > self.threshold
        ]


def valid(reading: Any) -> dict[str, Any]:
    """A reading with 8 numeric values, or a ValueError (the stage skips it)."""
    if not isinstance(reading, dict) or len(reading.get("values", ())) != 8:
        raise ValueError(f"not a reading: {reading!r}")
    return reading


def build(settings: Settings) -> tuple[sf.Flow, MqttSource]:
    source = MqttSource(
        f"{settings.prefix}/+/reading",
        hostname=settings.mqtt_host,
        port=settings.mqtt_port,
        codec=connectors.JSON,
    )
    flow = sf.Flow("sensor-anomaly")
    (
        flow.source("mqtt", source)
        .map("decode", connectors.decode, errors="skip")
        .map("validate", valid, errors="skip")
        .batch("window", settings.window, settings.window_wait)
        .map("score", Scorer(), device="cpu:0")
        .flat_map("anomalies", lambda found: found)
        .sink(
            "kafka",
            KafkaSink(
                settings.topic,
                settings.kafka,
                codec=connectors.JSON,
                key=lambda anomaly: anomaly["sensor"],
            ),
            concurrency=16,
        )
    )
    return flow, source
