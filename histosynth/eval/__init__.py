"""Measures of generated images: fidelity, privacy, seams, mask adherence, downstream segmentation (design §7)."""
