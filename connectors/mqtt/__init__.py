"""MQTT source and sink for sensors, on aiomqtt (``pip install streamflow[mqtt]``).

- :class:`MqttSource`: topic wildcards, QoS 0 or 1; QoS 1 is acknowledged after processing.
- :class:`MqttSink`: QoS 1 items are acked once the broker confirmed them.

See docs/CONNECTORS.md.
"""

from ._sink import MqttMessage as MqttMessage
from ._sink import MqttSink as MqttSink
from ._source import MqttSource as MqttSource
from ._source import MqttSourceStats as MqttSourceStats

__all__ = ["MqttMessage", "MqttSink", "MqttSource", "MqttSourceStats"]
