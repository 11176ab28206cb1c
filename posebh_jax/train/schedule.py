"""The stage schedule (spec §3.2): which parameter groups train, and which PoseBH parts are on.

The config declares everything in optimizer steps (`configs/common.py:epochs` converts):

  schedule.freeze_hooks.<group>  the reference's freeze-hook lists for `backbone`, `heads`,
                                 `proto_head`, e.g.
                                 (("freeze", 0), ("freeze", 73000), ("thaw", 131400))
  schedule.proto_freeze_step     keypoint prototypes stop their EMA (ProtoFreezeHook)
  schedule.cps_start_step        prototypes are clustered, CPS loss on (CPSInitHook)
  schedule.css_start_step        cross-type self-supervision on (CSSEnableHook)

Events at the same step apply in list order, each at the start of its step. Hook bookkeeping:
intended, 'freeze' freezes and 'thaw' thaws. With `reference_compat.freeze_hook_bookkeeping`
(spec §6.8) the reference's: 'freeze' of an already-frozen group marks it non-learnable forever,
so ViT-B's (("freeze", 0), ("freeze", 50 ep), ("thaw", 90 ep)) never trains the backbone.

A `Stage` is static (hashable): the loop compiles one train step per distinct stage. It is a
pure function of the step, so a run resumed anywhere is in the same stage as an uninterrupted one.
`StageSchedule` computes every stage of a run once (at its boundaries); the loop looks steps up
in it instead of re-deriving the stage from the config every step.
"""

from __future__ import annotations

import bisect
import dataclasses
from typing import Sequence

import ml_collections

from posebh_jax.objective.compat import ReferenceCompat
from posebh_jax.train.optimizer import GROUPS

@dataclasses.dataclass(frozen=True)
class Stage:
  """What is on at one step.

  Attributes:
    trainable: the parameter groups that receive gradients and updates.
    update_prototypes: keypoint-prototype EMA on.
    cps: cluster-prototype supervision on (the cluster table exists).
    css: cross-type self-supervision on.
  """
  trainable: tuple[str, ...]
  update_prototypes: bool
  cps: bool
  css: bool


def parse_events(events: Sequence[Sequence], where: str) -> list[tuple[str, int]]:
  """(("freeze", 0), ("thaw", 50)) → [("freeze", 0), ("thaw", 50)], checked; a bad entry names
  `where`."""
  out = []
  for e in events:
    ok = (isinstance(e, (tuple, list)) and len(e) == 2 and e[0] in ("freeze", "thaw")
          and isinstance(e[1], int) and not isinstance(e[1], bool))
    if not ok:
      raise ValueError(f"{where}: bad freeze-hook event {e!r}; expected ('freeze', <step>) or "
                       "('thaw', <step>)")
    out.append((str(e[0]), int(e[1])))
  return out


def group_trainable(events: Sequence[tuple[str, int]], step: int, *,
                    reference_bookkeeping: bool) -> bool:
  """Whether a group trains at `step` after its events up to and including `step`."""
  trainable, locked = True, False
  for action, at in sorted(events, key=lambda e: e[1]):  # Stable: list order within a step.
    if at > step:
      break
    if action == "freeze":
      if not trainable and reference_bookkeeping:
        locked = True  # Already frozen → "non-learnable" for good (spec §3.2 / §6.8).
      trainable = False
    elif not locked:
      trainable = True
  return trainable


def reference_compat(config: ml_collections.ConfigDict) -> ReferenceCompat:
  """`config.reference_compat` as the one `ReferenceCompat` (unknown names raise)."""
  return ReferenceCompat.from_mapping(config.reference_compat.to_dict())


def _started(start: int, step: int) -> bool:
  return 0 <= start <= step


def stage_at(config: ml_collections.ConfigDict, step: int, groups: Sequence[str] = GROUPS
             ) -> Stage:
  """The stage in force at optimizer step `step` (`groups`: those the model has)."""
  s = config.schedule
  compat = reference_compat(config).freeze_hook_bookkeeping
  hooks = s.freeze_hooks
  for name in hooks:
    if name not in GROUPS:
      raise ValueError(f"schedule.freeze_hooks.{name}: unknown group; known: {GROUPS}")
  trainable = tuple(
      g for g in groups
      if group_trainable(parse_events(hooks.get(g, ()), f"schedule.freeze_hooks.{g}"), step,
                         reference_bookkeeping=compat))
  proto = bool(config.model.use_proto_head)
  return Stage(trainable=trainable,
               update_prototypes=proto and not _started(s.proto_freeze_step, step),
               cps=proto and _started(s.cps_start_step, step),
               css=proto and _started(s.css_start_step, step))


def thawed_at(config: ml_collections.ConfigDict, step: int, groups: Sequence[str] = GROUPS
              ) -> tuple[str, ...]:
  """Groups that train at `step` but did not at `step − 1` (their Adam state restarts)."""
  if step <= 0:
    return ()
  before = set(stage_at(config, step - 1, groups).trainable)
  return tuple(g for g in stage_at(config, step, groups).trainable if g not in before)


def stage_boundaries(config: ml_collections.ConfigDict, groups: Sequence[str] = GROUPS
                     ) -> list[int]:
  """Steps in [0, num_steps) where the stage differs from the previous step's (0 included)."""
  s = config.schedule
  candidates = {0, s.proto_freeze_step, s.cps_start_step, s.css_start_step}
  for g in s.freeze_hooks:
    candidates.update(at for _, at in parse_events(s.freeze_hooks[g], f"schedule.freeze_hooks.{g}"))
  out = []
  for c in sorted(x for x in candidates if 0 <= x < config.train.num_steps):
    if c == 0 or stage_at(config, c, groups) != stage_at(config, c - 1, groups):
      out.append(c)
  return out


@dataclasses.dataclass(frozen=True)
class StageSchedule:
  """Every stage of a run, computed once from the config.

  Attributes:
    boundaries: the steps where the stage changes (`stage_boundaries`, 0 first), ascending.
    stages: the stage in force from each boundary on.
  """
  boundaries: tuple[int, ...]
  stages: tuple[Stage, ...]

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, groups: Sequence[str] = GROUPS
                  ) -> "StageSchedule":
    bounds = tuple(stage_boundaries(config, groups))
    return cls(bounds, tuple(stage_at(config, b, groups) for b in bounds))

  def at(self, step: int) -> Stage:
    """The stage in force at optimizer step `step` (= `stage_at(config, step, groups)`)."""
    return self.stages[max(0, bisect.bisect_right(self.boundaries, step) - 1)]

  def thawed_at(self, step: int) -> tuple[str, ...]:
    """Groups that train at `step` but did not at `step − 1` (= `thawed_at(config, step)`)."""
    if step <= 0 or step not in self.boundaries:
      return ()
    before = set(self.at(step - 1).trainable)
    return tuple(g for g in self.at(step).trainable if g not in before)
