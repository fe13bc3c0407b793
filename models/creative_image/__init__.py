"""Creative images: encoders, the availability gate, the pairwise reward model, the generate-inspect-rank loop."""
