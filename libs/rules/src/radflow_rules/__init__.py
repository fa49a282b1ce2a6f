"""The site's rule file, shared by every service that reads it.

The rule model and its evaluation, the loader (YAML in, every problem with its line
out) and its generic YAML reader, destinations (kinds, peers, authentication, TLS),
and live reloading. The router routes by it; ingest reads its STAT policy; the
forwarder and report-return read its destinations. No metric is created here: a
service passes in the metric families it owns.
"""
