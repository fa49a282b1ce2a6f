"""The shared contract of the radflow pipeline.

Everything that crosses a process boundary lives here once: event models and topic
names, settings, the Kafka producer and consumer loop, the blob store, metrics,
health endpoints and logging. Services import it; none re-implements it.
"""
