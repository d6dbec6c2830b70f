"""Training SAM: data, prompt simulation, losses, sharding, the trainer and evaluation."""
