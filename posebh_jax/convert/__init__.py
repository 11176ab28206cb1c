"""Reading PyTorch checkpoints without torch and converting them to flax variable trees."""
