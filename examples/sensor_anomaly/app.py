"""The flow: sensor readings over MQTT, windowed per sensor in event time, scored by an
autoencoder pinned to ``cpu:0``, anomalies written to a Kafka topic.

    MqttSource("{prefix}/+/reading")   QoS 1: a reading is acked once its window is done
      -> decode (JSON; malformed readings are skipped and logged)
      -> validate (8 numeric values and a time stamp; others are skipped and logged)
      -> by_sensor: key_by the reading's sensor
      -> window: per sensor, tumbling windows of 32 samples (0.32 s at 100 Hz) by the
         readings' time stamps; 0.1 s of lateness; a late reading is scored on its own
      -> score: autoencoder on device "cpu:0" (a dedicated worker thread), a window at once
      -> anomalies: keep readings whose reconstruction error is above the threshold
      -> KafkaSink(topic): acks=all, keyed by sensor
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from streamflow.connectors import JSON, decode
from streamflow.connectors.kafka import KafkaSink
from streamflow.connectors.mqtt import MqttSource

import streamflow as sf

from .model import AutoEncoder, train

Reading = dict[str, Any]


@dataclass
class Settings:
    prefix: str = "sensors"
    topic: str = "anomalies"
    mqtt_host: str = "127.0.0.1"
    mqtt_port: int = 1883
    kafka: str = "127.0.0.1:9092"
    window: int = 32  # samples per sensor window: windows of window / hz seconds
    hz: float = 100.0  # how often a sensor samples (its readings' "ts" step)
    lateness: float = 0.1  # seconds of event time to wait for a reading out of order
    idle: float = 0.5  # no reading for this long: the windows close with the clock


class Scorer(sf.Stage[sf.Window[Reading], list[Reading]]):
    """Scores one sensor's window of readings at once; trains its model in ``setup``
    (on cpu:0)."""

    def __init__(self) -> None:
        self.model: AutoEncoder | None = None
        self.threshold = 0.0

    def setup(self, context: sf.StageContext) -> None:
        self.model, self.threshold = train()

    def process(self, window: sf.Window[Reading]) -> list[Reading]:
        assert self.model is not None
        readings = window.items
        scores = self.model.score(torch.tensor([r["values"] for r in readings]))
        return [
            {"sensor": r["sensor"], "seq": r["seq"], "score": round(float(s), 4)}
            for r, s in zip(readings, scores, strict=True)
            if s > self.threshold
        ]


def valid(reading: Any) -> Reading:
    """A reading with 8 numeric values and a finite time stamp ``ts`` (seconds), or a
    ValueError (the stage skips it)."""
    if not isinstance(reading, dict) or len(reading.get("values", ())) != 8:
        raise ValueError(f"not a reading: {reading!r}")
    ts = reading.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
        raise ValueError(f"a reading without a time stamp: {reading!r}")
    return reading


def build(settings: Settings) -> tuple[sf.Flow, MqttSource]:
    source = MqttSource(
        f"{settings.prefix}/+/reading",
        hostname=settings.mqtt_host,
        port=settings.mqtt_port,
        codec=JSON,
    )
    flow = sf.Flow("sensor-anomaly")
    (
        flow.source("mqtt", source)
        .map("decode", decode, errors="skip")
        .map("validate", valid, errors="skip")
        .key_by("by_sensor", lambda r: r["sensor"])
        .window(
            "window",
            sf.Tumbling(settings.window / settings.hz),
            time=lambda r: r["ts"],
            lateness=settings.lateness,
            late="emit",  # a reading that missed its window is scored in an update
            idle=settings.idle,
        )
        .map("score", Scorer(), device="cpu:0")
        .flat_map("anomalies", lambda found: found)
        .sink(
            "kafka",
            KafkaSink(
                settings.topic,
                settings.kafka,
                codec=JSON,
                key=lambda anomaly: anomaly["sensor"],
            ),
            concurrency=16,
        )
    )
    return flow, source
