"""Adapters to the outside world. Nothing here imports `agent`."""
