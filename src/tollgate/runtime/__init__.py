"""Compiling config into an immutable Runtime; workers, supervisor, reload and drain."""
