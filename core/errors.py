"""Errors shared across layers."""

from __future__ import annotations


class AdstreamError(Exception):
    """Base class for errors raised by adstream."""


class InvalidRecord(AdstreamError):
    """A record that cannot be accepted. ``reason`` is a short, stable label used as a metric label
    and as the dead-letter reason; ``detail`` is the human-readable explanation."""

    REASONS = (
        "oversized",
        "malformed_json",
        "not_an_object",
        "unknown_schema_version",
        "unknown_event_type",
        "missing_field",
        "wrong_type",
        "invalid_value",
        "clock_skew",
        "orphan_click",
        "orphan_conversion",
        "late",
        "duplicate_request_id",  # the joiner saw a (request, ad) key again with other content
        "state_full",  # the joiner's state bound (join.max_pending) was reached
    )

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown dead-letter reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ConfigError(AdstreamError):
    """Configuration that cannot work; raised once, at the edge."""
