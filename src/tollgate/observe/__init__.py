"""Observing calls: call records, metrics, tracing, log queue, sinks, rollups and sketches."""
