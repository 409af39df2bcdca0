"""Layers: the hardened tar reader, the deterministic tar writer, on-disk format and ownership records."""
