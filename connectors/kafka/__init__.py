"""Kafka source and sink on aiokafka (``pip install streamflow[kafka]``).

- :class:`KafkaSource`: a consumer-group member; at least once, commits only what the flow
  finished, bounded memory with pause/resume.
- :class:`KafkaSink`: acks=all and idempotence; an item is acked after the broker confirmed;
  ``transactional=True``: one Kafka transaction per checkpoint (exactly once for
  ``read_committed`` consumers), failing with :class:`TransactionFailed` when fenced.
- :class:`DeadLetterTopic`: a dead-letter sink keeping the raw bytes and the reason.
- :class:`Security`: TLS / SASL settings.

See docs/CONNECTORS.md.
"""

from ._security import Security as Security
from ._sink import DeadLetterTopic as DeadLetterTopic
from ._sink import KafkaMessage as KafkaMessage
from ._sink import KafkaSink as KafkaSink
from ._sink import TransactionFailed as TransactionFailed
from ._source import KafkaSource as KafkaSource
from ._source import KafkaSourceStats as KafkaSourceStats

__all__ = [
    "DeadLetterTopic",
    "KafkaMessage",
    "KafkaSink",
    "KafkaSource",
    "KafkaSourceStats",
    "Security",
    "TransactionFailed",
]
