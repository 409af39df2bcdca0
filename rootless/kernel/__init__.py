"""Thin, typed wrappers over Linux system calls and confined path resolution."""
