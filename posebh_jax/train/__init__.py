"""Training: state, optimizer, sharding, step, checkpointing and the loop."""
