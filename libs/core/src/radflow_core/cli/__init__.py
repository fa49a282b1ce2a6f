"""``radflow``: the operator's command line (dead letters, traces, the delivery ledger).

It reads the same RADFLOW_* settings as the services, so in a pod (``kubectl exec``)
or next to ``make run`` it needs no flags to find the brokers and the blob store.
"""
