"""Training: mesh, the jitted step, schedules, checkpoints, metrics and the loop behind ``memlm train``."""
