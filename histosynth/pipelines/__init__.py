"""Thin compositions of data, conditions, models, samplers and writers: what the CLI runs."""
