"""Pieces of ``research.benchmark``: the cases and implementations (``cases``), compiling and
interleaved timing (``timing``), and the tables, plots and speed bars (``report``)."""
