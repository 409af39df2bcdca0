"""The environment: what this machine allows (probes), the strategy chosen from it, user namespaces, paths."""
