"""Training-loop infrastructure: orbax checkpoints and preemption, metrics files and progress."""
