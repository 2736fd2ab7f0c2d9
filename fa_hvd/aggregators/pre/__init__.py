"""Pre-aggregation stages ``(p, n) -> (p', n)`` applied before a rule (``"nnm+krum"``)."""
