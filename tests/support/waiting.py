"""wait_for lives in :mod:`radflow_devstack.kit.waiting`; this name stays for
tests/faults, which imports it from here."""

from radflow_devstack.kit.waiting import wait_for

__all__ = ["wait_for"]
