"""Helpers for tests: real-stack handles, a fault-injecting TCP proxy, DICOM builders."""
