"""Experiment configs: ``get_config(arg)`` per file; common.py holds the shared defaults."""
