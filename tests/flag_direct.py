from fa_hvd.aggregators.flag_direct import flag_direct  # noqa: F401
