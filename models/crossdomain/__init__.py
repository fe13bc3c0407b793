"""Cross-domain CTR for cold-start users: DACDR (domain-aware cross-attention), its stream model and
the cold-start evaluation protocol. See ``docs/crossdomain.md``."""
