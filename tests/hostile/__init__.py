"""Hostile layer corpus and the helper that runs layer code unprivileged (shared by the layer tests)."""
