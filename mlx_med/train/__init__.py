"""Training: config, step, loop, checkpoints, loss plots and the memory planner."""
