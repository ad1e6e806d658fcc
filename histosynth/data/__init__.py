"""Data: slides, tissue and tiling, labels, the on-disk dataset and the bundled demo data."""
