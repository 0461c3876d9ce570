"""Upstreams: choosing a target for each request and surviving its failures."""
