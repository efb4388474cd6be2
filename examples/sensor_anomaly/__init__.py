"""Sensor anomaly detection: MQTT -> windows -> torch autoencoder on cpu:0 -> Kafka."""
