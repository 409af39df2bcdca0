"""The content-addressed store: blobs, chain-id layer dirs, images, cache, locks, check, migration."""
