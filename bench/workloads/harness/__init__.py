"""The benchmark harness behind bench/run.py: users, measurement, base images, builders, references, reports."""
