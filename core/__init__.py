"""Shared contracts: events and schemas, settings, metric names, errors, small ports.

Nothing in here performs I/O; every other layer may import it.
"""
