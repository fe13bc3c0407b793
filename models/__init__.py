"""Pure learning code: tensors and plain data in, tensors and plain data out.

No Kafka, Feast, HTTP, clock or environment reads here; callers pass event times and data in.
Subpackages: :mod:`models.ctr` (TorchRec CTR model with the Data-Driven Prior) and
:mod:`models.evaluation` (the offline incremental-learning protocol).
"""
