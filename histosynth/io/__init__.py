"""Writers and readers of output files; nothing here knows about models."""
