"""`--config.distributed.*` reaches `jax.distributed.initialize`.

Training, evaluation and FSDP on several processes run through the real CLIs in
tests/test_multihost_cli.py (equal losses and final parameters of 2 processes and 1).
"""

from configs import synthetic


def test_distributed_config_reaches_jax_distributed(monkeypatch):
  # `--config.distributed.*` → jax.distributed.initialize's arguments; unset fields are left to
  # JAX's cluster auto-detection (TPU pods, SLURM), so they must not be passed at all.
  import jax
  from posebh_jax.train import distributed
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  dist = synthetic.get_config("tiny").distributed
  distributed.initialize_distributed(dist)
  dist.coordinator_address, dist.num_processes, dist.process_id = "host0:1234", 4, 2
  distributed.initialize_distributed(dist)
  assert calls == [{}, dict(coordinator_address="host0:1234", num_processes=4, process_id=2)]
