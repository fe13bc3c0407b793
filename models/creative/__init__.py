"""Creative ranking: JAC (joint ad and creative ranking, Peri-CR+), the NSCTR metric, baselines.

See docs/creative.md. Pure: no Kafka, clock, environment or HTTP.
"""
