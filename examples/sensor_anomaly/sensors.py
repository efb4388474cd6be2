"""Simulated sensors: publish readings over MQTT, some of them anomalous."""

from __future__ import annotations

import asyncio
import random
import time

import torch
from streamflow.connectors import JSON
from streamflow.connectors.mqtt import MqttMessage, MqttSink

from .model import anomalous_readings, normal_readings


async def publish_readings(
    prefix: str,
    *,
    sensors: int = 4,
    readings: int = 200,
    anomalies: int = 5,
    hostname: str = "127.0.0.1",
    port: int = 1883,
    rate: float = 0.0,
    hz: float = 100.0,
    seed: int = 1,
) -> set[tuple[str, int]]:
    """Publish ``readings`` readings per sensor to ``{prefix}/{sensor}/reading`` (QoS 1)
    as JSON ``{"sensor", "seq", "ts", "values"}``; return the ``(sensor, seq)`` made
    anomalous. The sensors sample together at ``hz``: reading ``seq`` is stamped ``ts``
    ``start + seq / hz`` seconds (``start``: now). They are sent ``rate`` a second (0: at
    once), like a gateway forwarding what its sensors sampled."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    total = sensors * readings
    bad = set(rng.sample(range(total), anomalies))
    normal = normal_readings(total, generator)
    odd = anomalous_readings(total, generator)
    injected: set[tuple[str, int]] = set()
    start = time.time()
    async with MqttSink(hostname=hostname, port=port, codec=JSON) as sink:
        for n in range(total):
            sensor, seq = f"s{n % sensors}", n // sensors
            values = odd[n] if n in bad else normal[n]
            if n in bad:
                injected.add((sensor, seq))
            reading = {
                "sensor": sensor,
                "seq": seq,
                "ts": round(start + seq / hz, 6),
                "values": [round(v, 5) for v in values.tolist()],
            }
            await sink.send(MqttMessage(f"{prefix}/{sensor}/reading", reading))
            if rate:
                await asyncio.sleep(1 / rate)
    return injected
