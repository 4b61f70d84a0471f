"""asv benchmarks of arrayopt (see ``common.py`` for the shared data and timing helpers)."""
