"""The registry client: HTTP, auth, registries.conf, verified pulls and pushes."""
