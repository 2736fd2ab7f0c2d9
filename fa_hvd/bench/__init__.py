"""Benchmarks of fa_hvd, run by the ``fa-hvd-bench`` console script (:mod:`.cli`)."""
