"""Root filesystem drivers: how a step gets a writable root over its parent's layers."""
