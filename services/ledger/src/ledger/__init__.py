"""radflow ledger: per study and destination, what was routed and what became of it."""
