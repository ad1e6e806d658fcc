"""CLI commands: evaluate."""
from histosynth.cli import app  # noqa: F401
