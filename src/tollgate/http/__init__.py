"""HTTP/1.1 wire layer: the client-facing listener, the upstream client and their helpers."""
