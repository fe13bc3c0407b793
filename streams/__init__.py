"""Kafka edges: the embedded broker, producers and consumers, faust workers and replay.

May import ``core``, ``features`` and ``models``; nothing outside ``streams`` (and the thin producer
port of ``online``) talks to Kafka directly.
"""
