"""V*-mini: a procedural V*-Bench-style world where tool use must emerge (an experiment on the generic trainer)."""
