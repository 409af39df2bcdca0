"""Blobs: compression algorithms (and, next, the one verifying reader and digest parsing)."""
