"""Training: the Trainer loop and what it owns (optimizer, schedule, checkpoints, devices)."""
