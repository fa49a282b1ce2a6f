"""radflow ingest: receives DICOM instances and hands each one on durably.

An instance is acknowledged to its sender only after its bytes are in the blob store
and its ``dicom.instance.received`` event is acknowledged by Kafka (the claim check).
"""
