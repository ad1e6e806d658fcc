"""CLI commands: train."""
from histosynth.cli import app  # noqa: F401
