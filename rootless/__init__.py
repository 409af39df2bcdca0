"""rbuild: a rootless, daemonless OCI image builder."""

__version__ = "0.1.0"
