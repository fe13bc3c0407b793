"""The adstream command line. Nothing imports this package; it wires the edges together."""
