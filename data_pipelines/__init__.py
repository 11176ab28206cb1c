"""Input pipeline: annotation readers, mmpose-compatible transforms and target encoders."""
