"""Conditions: how each kind of input is encoded, its null value, and how it is cropped to a canvas window."""
