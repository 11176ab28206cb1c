"""Error types that several layers raise or catch (below `train/` and `convert/`, so neither
imports the other for them)."""


class CheckpointMismatchError(ValueError):
  """A checkpoint (or converted weights) that does not belong to this config's model."""


class CheckpointDamagedError(RuntimeError):
  """A checkpoint that cannot be restored as saved (unreadable, or its digest differs)."""
