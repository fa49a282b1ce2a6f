"""Pixel-data codecs: decode, re-encode losslessly and verify, in memory or frame by
frame from file to file.

Only the services that touch pixel data depend on it (transcode, and the forwarder
when a destination needs another syntax), so the others carry no image codecs.
"""
