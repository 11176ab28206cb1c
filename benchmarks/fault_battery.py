r"""Issue 15's fault battery: faults met the way an unlucky user meets them, each outcome classified.

  nice -n 19 python benchmarks/fault_battery.py [--only=case,case] [--list] [--root=DIR] [--keep]

Every case runs the real command-line tools (`posebh-train`, `posebh-eval`, `posebh-infer`,
`posebh-convert`) as subprocesses on the tiny synthetic config, after damaging real files (kill -9
and SIGTERM, truncated / bit-flipped / deleted checkpoint files, bad images and annotation files,
hostile .pth files, dangerous --overwrite targets, non-finite settings, mismatched model fields).
Its outcome is classified from the exit status, stderr and the files on disk:

  clear error    rc != 0, no traceback, the last line names the file / record / field
  counted skip   rc == 0 and the log counts what was skipped, naming it
  correct        rc == 0 and the result is right (e.g. a resumed run reproduces the losses of an
                 undamaged run bit for bit)
  unclear error  rc != 0, no traceback, but the last line does not name what is wrong
  traceback      a Python traceback
  crash          killed by a signal (SIGSEGV, ...)
  silent         rc == 0, and neither a counted skip nor the right result
  data lost      a file outside the job's own outputs changed, or a checkpoint disappeared

One line per case and the counts per class are printed; each case states its expected class. The
exit status is 1 if any case ends outside {clear error, counted skip, correct} or differs from its
expected class. Cases that need ../shared (the golden tiny .pth, the MPII samples) are listed as
not run where it is absent.

Shared inputs (the synthetic data, one 4-step training run with a checkpoint at every step, the
converted tiny reference weights) are built once under --root (default: a temporary directory,
removed at the end unless --keep).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path[:0] = [str(REPO), str(REPO / "tests")]

# One copy of the tests' helpers: the file witness and the hand-built .pth writers.
from faultcheck import changed, snapshot  # noqa: E402

ACCEPTABLE = ("clear error", "counted skip", "correct")
CLASSES = ACCEPTABLE + ("unclear error", "traceback", "crash", "silent", "data lost", "not run")
TRAIN = ("configs/synthetic.py:tiny",)
BASE_STEPS = 4  # The shared run: checkpoints at 1, 2, 3, 4 (stage 2 starts at step 2).


@dataclasses.dataclass
class Run:
  """One finished subprocess."""
  args: list[str]
  rc: int
  out: str
  err: str
  wall: float

  @property
  def log(self) -> str:
    return self.out + self.err

  @property
  def last(self) -> str:
    lines = [line for line in self.err.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@dataclasses.dataclass
class Outcome:
  cls: str
  detail: str


@dataclasses.dataclass
class Case:
  name: str
  item: int  # Issue 15's item.
  expected: str
  fn: Callable[["Battery", Path], Outcome]
  needs_shared: bool = False


CASES: dict[str, Case] = {}


def case(item: int, expected: str, needs_shared: bool = False):
  def register(fn):
    name = fn.__name__
    CASES[name] = Case(name, item, expected, fn, needs_shared)
    return fn
  return register


def _env() -> dict[str, str]:
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # One CPU device: the fastest way through these tiny runs.
  return env


def run_module(module: str, *args: str, cwd: Path = REPO, timeout: float = 900) -> Run:
  cmd = [sys.executable, "-m", module, *map(str, args)]
  t = time.time()
  try:
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True,
                       timeout=timeout, errors="replace")
    return Run(cmd, r.returncode, r.stdout, r.stderr, time.time() - t)
  except subprocess.TimeoutExpired as e:
    return Run(cmd, -9, str(e.stdout or ""), str(e.stderr or "") + "\n(timed out)",
               time.time() - t)


def classify(r: Run, *, witness: "Witness", names: tuple[str, ...] = (), prog: str = "",
             skip: str | None = None, correct: Callable[[], str | None] | None = None,
             right: str = "as an undamaged run") -> Outcome:
  """The class of one outcome.

  Args:
    r: the run (the last one, where a case runs several).
    witness: files that must not change, and checkpoints that must not disappear.
    names: what the last stderr line of an error must contain (file, record, field).
    prog: the prefix of the tool's one-line errors ("posebh-train: ").
    skip: a regex that counts the skip in the log (rc 0).
    correct: returns None if the result is right, else why not (rc 0).
  """
  lost = witness.lost()
  if lost:
    return Outcome("data lost", "; ".join(lost[:3]) + (" ..." if len(lost) > 3 else ""))
  if r.rc < 0:
    return Outcome("crash", f"signal {-r.rc} ({signal.Signals(-r.rc).name})"
                   if -r.rc in signal.valid_signals() else f"rc {r.rc}")
  if "Traceback (most recent call last)" in r.err:
    return Outcome("traceback", r.last[:160])
  if r.rc != 0:
    # The tool's own line (a list of keys may follow it; input threads may log after it).
    said = [line for line in r.err.splitlines() if prog and line.startswith(prog)]
    line = said[-1] if len(said) == 1 else r.last
    if line.startswith(prog) and all(n in line for n in names):
      return Outcome("clear error", line)
    return Outcome("unclear error", line[:200] + f" (wanted {names})")
  if skip is not None:
    m = re.search(skip, r.log)
    if m:
      return Outcome("counted skip", m.group(0)[:200])
  if correct is not None:
    why = correct()
    if why is None:
      return Outcome("correct", right)
    return Outcome("silent", why)
  return Outcome("silent", "rc 0, nothing said")


class Witness:
  """What a case must not change: files under `roots` (outside `own`), checkpoints of `workdir`."""

  def __init__(self, *roots: Path, own: tuple[Path, ...] = (), workdir: Path | None = None):
    # JAX's persistent compilation cache is a cache: any job may add compiled code to it.
    own = own + tuple(Path(r) / "compilation_cache" for r in roots)
    self.roots, self.own, self.workdir = roots, own, workdir
    self.before = snapshot(*roots, exclude=own)
    self.steps = _steps(workdir) if workdir else []

  def lost(self) -> list[str]:
    out = changed(self.before, snapshot(*self.roots, exclude=self.own))
    if self.workdir:
      # A checkpoint may be moved aside as damaged (kept), never deleted.
      kept = set(_steps(self.workdir)) | set(_steps(self.workdir, "checkpoints_damaged"))
      out += [f"checkpoint {s} lost" for s in self.steps if s not in kept]
    return out


def _steps(workdir: Path, sub: str = "checkpoints") -> list[int]:
  d = workdir / sub
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _losses(workdir: Path) -> list[tuple[int, float]]:
  path = workdir / "train_metrics.jsonl"
  if not path.exists():
    return []
  return [(r["step"], r["loss/total"]) for r in map(json.loads, path.read_text().splitlines())]


class Battery:
  """Shared inputs, built once, and the per-case helpers."""

  def __init__(self, root: Path):
    self.root = root
    self.cases = root / "cases"
    self.cases.mkdir(parents=True, exist_ok=True)
    self._base: Path | None = None
    self._weights: Path | None = None

  # --- Shared inputs -----------------------------------------------------------------------

  @property
  def data(self) -> Path:
    return self.root / "data"

  def base(self) -> Path:
    """A finished 4-step run on the synthetic data, a checkpoint at every step."""
    if self._base is None:
      wd = self.root / "base"
      if not (wd / "checkpoints" / str(BASE_STEPS)).is_dir():
        self.ensure_data()
        # Compiling both stages' steps: over 15 min on a 2-core machine shared with other jobs.
        r = self.train(wd, num_steps=BASE_STEPS, timeout=3600)
        if r.rc != 0:
          raise RuntimeError(f"the base run failed:\n{r.err[-3000:]}")
      self._base = wd
    return self._base

  def base_losses(self) -> list[tuple[int, float]]:
    return _losses(self.base())

  def weights(self) -> Path:
    """posebh-convert of ../shared/golden/tiny_posebh.pth."""
    if self._weights is None:
      out = self.root / "tiny_weights"
      if not out.is_dir():
        r = self.convert(out)
        if r.rc != 0:
          raise RuntimeError(f"converting the tiny reference failed:\n{r.err[-3000:]}")
      self._weights = out
    return self._weights

  # --- Commands ----------------------------------------------------------------------------

  def train(self, workdir: Path, *overrides: str, num_steps: int = BASE_STEPS,
            data: Path | None = None, config: str = TRAIN[0], timeout: float = 900) -> Run:
    return run_module(
        "posebh_jax.main_train", f"--config={config}", f"--workdir={workdir}",
        f"--config.data.root={data or self.data}", f"--config.train.num_steps={num_steps}",
        "--config.train.eval_at_end=False", "--config.train.checkpoint_every=1",
        "--config.train.keep_checkpoints=10", "--config.train.log_every=1", *overrides,
        timeout=timeout)

  def start_train(self, workdir: Path, num_steps: int = BASE_STEPS) -> subprocess.Popen:
    args = [sys.executable, "-m", "posebh_jax.main_train", f"--config={TRAIN[0]}",
            f"--workdir={workdir}", f"--config.data.root={self.data}",
            f"--config.train.num_steps={num_steps}", "--config.train.eval_at_end=False",
            "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=10",
            "--config.train.log_every=1"]
    return subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, errors="replace")

  def convert(self, out: Path | str, *extra: str, pth: Path | None = None,
              cwd: Path = REPO) -> Run:
    return run_module("posebh_jax.main_convert", f"--config={REPO / 'configs/posebh.py'}:"
                      "tiny_reference", f"--pth={pth or SHARED / 'golden/tiny_posebh.pth'}",
                      f"--out={out}", *extra, cwd=cwd)

  def infer(self, *args: str) -> Run:
    return run_module("posebh_jax.main_infer", f"--config={TRAIN[0]}",
                      f"--workdir={self.base()}", "--flip_test=False", *args)

  def eval(self, data: Path) -> Run:
    return run_module("posebh_jax.main_eval", f"--config={TRAIN[0]}", f"--workdir={self.base()}",
                      f"--config.data.root={data}", f"--out={data.parent / 'eval_out'}")

  # --- Copies to damage --------------------------------------------------------------------

  def copy_base(self, d: Path, *, keep: str = "all") -> Path:
    """The base run copied to `d/wd` (its compilation cache too, so nothing is recompiled);
    keep="cache": only the compilation cache (a fresh run that compiles nothing)."""
    self.base()
    wd = d / "wd"
    if keep == "cache":
      wd.mkdir(parents=True)
      shutil.copytree(self.base() / "compilation_cache", wd / "compilation_cache")
    else:
      shutil.copytree(self.base(), wd)
    return wd

  def ensure_data(self) -> Path:
    """The tiny config's synthetic data, rendered as posebh-train would (what the base run and
    every case read)."""
    if not (self.data / "manifest.json").exists():
      from configs import synthetic
      from posebh_jax import experiment
      cfg = synthetic.get_config("tiny")
      cfg.data.root = str(self.data)
      experiment.resolve_dataset_files(cfg, str(self.root))
    return self.data

  def copy_data(self, d: Path) -> Path:
    self.ensure_data()
    data = d / "data"
    shutil.copytree(self.data, data)
    return data

  def resumed_right(self, wd: Path) -> Callable[[], str | None]:
    """Each step logged once, losses bit-identical to the undamaged run's."""
    def check():
      got, want = _losses(wd), self.base_losses()
      if [s for s, _ in got] != list(range(1, BASE_STEPS + 1)):
        return f"steps logged {[s for s, _ in got]}"
      if got != want:
        return f"losses differ from the undamaged run: {got} vs {want}"
      return None
    return check


# === Item 1: nothing non-finite is ever checkpointed ==========================================

@case(1, "clear error")
def nan_huge_learning_rate(b: Battery, d: Path) -> Outcome:
  wd = b.copy_base(d)
  w = Witness(REPO, b.data, b.base(), workdir=wd)
  r = b.train(wd, "--config.train.learning_rate=1e39", num_steps=BASE_STEPS + 2)
  out = classify(r, witness=w, prog="posebh-train: ", names=(
      "non-finite training state after step 5", f"last good checkpoint: step {BASE_STEPS}"))
  if out.cls == "clear error" and max(_steps(wd)) != BASE_STEPS:
    return Outcome("silent", f"a checkpoint after the last good step was saved: {_steps(wd)}")
  return out


@case(1, "clear error")
def nan_loss_weight(b: Battery, d: Path) -> Outcome:
  wd = b.copy_base(d)
  w = Witness(REPO, b.data, b.base(), workdir=wd)
  r = b.train(wd, "--config.loss.heatmap_weight=nan", num_steps=BASE_STEPS + 2)
  out = classify(r, witness=w, prog="posebh-train: ", names=("heatmap_weight",))
  if out.cls == "unclear error" and "non-finite" in r.last and "loss" in r.last:
    out = Outcome("clear error", r.last)
  return out


@case(1, "clear error")
def nan_learning_rate(b: Battery, d: Path) -> Outcome:
  wd = b.copy_base(d)
  w = Witness(REPO, b.data, b.base(), workdir=wd)
  r = b.train(wd, "--config.train.learning_rate=nan", num_steps=BASE_STEPS + 2)
  return classify(r, witness=w, prog="posebh-train: ", names=("learning_rate",))


# === Items 2 and 3: damaged checkpoints fall back to the newest intact one ====================

def _damaged_resume(b: Battery, d: Path, damage: Callable[[Path], None]) -> Outcome:
  """Damage step 4 of a copy of the base run; rerunning must fall back to the checkpoint before
  it, set step 4 aside, and retrain the steps after exactly as the undamaged run did."""
  wd = b.copy_base(d)
  prev = max(s for s in _steps(wd) if s < BASE_STEPS)
  damage(wd / "checkpoints" / str(BASE_STEPS))
  w = Witness(REPO, b.data, b.base(), workdir=wd)
  r = b.train(wd)
  out = classify(r, witness=w, correct=b.resumed_right(wd))
  if out.cls == "correct":
    want = f"resumed from step {prev}, the newest intact checkpoint; skipped damaged " \
           f"steps {BASE_STEPS}"
    if want not in r.err:
      return Outcome("silent", "the fallback was not reported")
    if not (wd / "checkpoints_damaged" / str(BASE_STEPS)).is_dir():
      return Outcome("data lost", "the damaged checkpoint was not kept")
    reason = r.err.split(f"checkpoint step {BASE_STEPS} in ")[1].split("\n")[0]
    out.detail = (f"fell back to step {prev}, retrained bit-identically; "
                  + reason.split(": ", 1)[-1][:90])
  return out


def _chunks(step_dir: Path) -> list[Path]:
  return sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir())


@case(3, "correct")
def ckpt_bit_rot(b: Battery, d: Path) -> Outcome:
  def damage(step):
    chunk = max(_chunks(step), key=lambda p: p.stat().st_size)
    raw = bytearray(chunk.read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(x ^ 0xFF for x in raw[mid:mid + 64])
    chunk.write_bytes(bytes(raw))
  return _damaged_resume(b, d, damage)


@case(2, "correct")
def ckpt_truncated_state(b: Battery, d: Path) -> Outcome:
  def damage(step):
    for chunk in _chunks(step):
      chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
  return _damaged_resume(b, d, damage)


@case(2, "correct")
def ckpt_deleted_metadata(b: Battery, d: Path) -> Outcome:
  return _damaged_resume(b, d, lambda step: (step / "state" / "_METADATA").unlink())


@case(2, "correct")
def ckpt_empty_iterator_state(b: Battery, d: Path) -> Outcome:
  def damage(step):
    for f in (step / "data").glob("*.json"):
      f.write_text("")
  return _damaged_resume(b, d, damage)


@case(2, "clear error")
def ckpt_all_damaged(b: Battery, d: Path) -> Outcome:
  wd = b.copy_base(d)
  for s in _steps(wd):
    (wd / "checkpoints" / str(s) / "state" / "_METADATA").unlink()
  w = Witness(REPO, b.data, b.base(), workdir=wd)
  r = b.train(wd)
  return classify(r, witness=w, prog="posebh-train: ",
                  names=(f"every checkpoint in {wd / 'checkpoints'} is damaged",))


# === Item 4: a checkpoint of another model ====================================================

def _mismatch(b: Battery, d: Path, override: str, field: str) -> Outcome:
  wd = b.copy_base(d)
  # Nothing of the run may change; only the compilation cache may gain entries.
  w = Witness(REPO, b.data, b.base(), wd, own=(wd / "compilation_cache",), workdir=wd)
  r = b.train(wd, override, num_steps=BASE_STEPS + 1)
  return classify(r, witness=w, prog="posebh-train: ",
                  names=(f"{wd / 'checkpoints'}/{BASE_STEPS} was written for another model",
                         f"model_config.{field}: checkpoint"))


@case(4, "clear error")
def mismatch_mlp_ratio(b: Battery, d: Path) -> Outcome:
  return _mismatch(b, d, "--config.model.mlp_ratio=2", "mlp_ratio")


@case(4, "clear error")
def mismatch_proto_num_in_class(b: Battery, d: Path) -> Outcome:
  return _mismatch(b, d, "--config.model.proto.num_in_class=2", "proto.num_in_class")


@case(4, "clear error")
def mismatch_embed_dim(b: Battery, d: Path) -> Outcome:
  return _mismatch(b, d, "--config.model.embed_dim=48", "embed_dim")


# === Item 5: kill -9, SIGTERM, reruns: each step once, bit-identical ==========================

def _wait(predicate, proc: subprocess.Popen, timeout: float = 900) -> bool:
  t = time.time()
  while not predicate():
    if proc.poll() is not None or time.time() - t > timeout:
      return False
    time.sleep(0.02)
  return True


def _interrupted(b: Battery, d: Path, when: Callable[[Path], bool], sig: int) -> Outcome:
  """A fresh run (compiled steps cached), interrupted by `sig` once `when(workdir)`; then the
  same command again, which must finish exactly as the uninterrupted base run."""
  wd = b.copy_base(d, keep="cache")
  proc = b.start_train(wd)
  hit = _wait(lambda: when(wd), proc)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=600)
  if not hit:
    return Outcome("not run", f"the run ended before the signal (rc {proc.returncode})")
  if sig == signal.SIGTERM and proc.returncode != 0:
    return Outcome("unclear error", f"SIGTERM: rc {proc.returncode}: {err.strip()[-200:]}")
  w = Witness(REPO, b.data, b.base(), workdir=wd)
  first = _steps(wd)
  r = b.train(wd)
  out = classify(r, witness=w, correct=b.resumed_right(wd))
  if out.cls == "correct":
    out.detail = f"checkpoints {first} after the signal; resumed, bit-identical"
  return out


@case(5, "correct")
def kill9_during_async_save(b: Battery, d: Path) -> Outcome:
  def saving(wd):
    c = wd / "checkpoints"
    names = os.listdir(c) if c.is_dir() else []
    return any(n.isdigit() for n in names) and any("tmp" in n for n in names)
  return _interrupted(b, d, saving, signal.SIGKILL)


@case(5, "correct")
def sigterm_then_rerun(b: Battery, d: Path) -> Outcome:
  def one_logged(wd):
    m = wd / "train_metrics.jsonl"
    return m.exists() and len(m.read_text().splitlines()) >= 1
  return _interrupted(b, d, one_logged, signal.SIGTERM)


@case(5, "correct")
def rerun_finished_job(b: Battery, d: Path) -> Outcome:
  wd = b.copy_base(d)
  w = Witness(REPO, b.data, b.base(), workdir=wd)
  r = b.train(wd)
  return classify(r, witness=w, correct=b.resumed_right(wd))


# === Item 6: posebh-convert --overwrite replaces only converted weights =======================

def _overwrite(b: Battery, d: Path, out: Path | str, cwd: Path, names: tuple[str, ...],
               *extra: str) -> Outcome:
  w = Witness(d)
  r = b.convert(out, *extra, cwd=cwd)
  return classify(r, witness=w, prog="posebh-convert: ", names=names)


@case(6, "clear error", needs_shared=True)
def convert_overwrite_training_workdir(b: Battery, d: Path) -> Outcome:
  wd = b.copy_base(d)
  return _overwrite(b, d, wd, REPO, (str(wd), "is not converted weights", "nothing was deleted"),
                    "--overwrite")


@case(6, "clear error", needs_shared=True)
def convert_overwrite_dot(b: Battery, d: Path) -> Outcome:
  project = d / "project"
  (project / ".git").mkdir(parents=True)
  (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
  (project / "README.md").write_text("# a project\n")
  return _overwrite(b, d, ".", project, (str(project), "nothing was deleted"), "--overwrite")


@case(6, "clear error", needs_shared=True)
def convert_overwrite_unrelated_folder(b: Battery, d: Path) -> Outcome:
  other = d / "thesis"
  other.mkdir()
  (other / "thesis.tex").write_text("\\documentclass{article}")
  return _overwrite(b, d, other, REPO, (str(other), "nothing was deleted"), "--overwrite")


@case(6, "clear error", needs_shared=True)
def convert_overwrite_weights_plus_user_file(b: Battery, d: Path) -> Outcome:
  out = d / "w"
  shutil.copytree(b.weights(), out)
  (out / "README.txt").write_text("which run these came from")
  return _overwrite(b, d, out, REPO, (str(out), "README.txt", "nothing was deleted"),
                    "--overwrite")


@case(6, "clear error", needs_shared=True)
def convert_overwrite_a_file(b: Battery, d: Path) -> Outcome:
  out = d / "notes.txt"
  out.write_text("mine")
  return _overwrite(b, d, out, REPO, (str(out),), "--overwrite")


@case(6, "clear error", needs_shared=True)
def convert_existing_without_overwrite(b: Battery, d: Path) -> Outcome:
  out = d / "w"
  shutil.copytree(b.weights(), out)
  return _overwrite(b, d, out, REPO, (str(out), "exists"))


@case(6, "correct", needs_shared=True)
def convert_overwrite_converted_weights(b: Battery, d: Path) -> Outcome:
  out = d / "w"
  shutil.copytree(b.weights(), out)
  w = Witness(d, own=(out,))
  r = b.convert(out, "--overwrite")

  def check():
    got = sorted(p.name for p in d.iterdir())
    if got != ["w"]:
      return f"left beside the output: {got}"
    if sorted(p.name for p in out.iterdir()) != sorted(p.name for p in b.weights().iterdir()):
      return "the replaced directory differs from a fresh conversion"
    return None
  return classify(r, witness=w, correct=check, right="replaced, nothing left beside it")


# === Items 7-10: image files ===================================================================

def _coco_train(data: Path, name: str = "synth_coco") -> tuple[Path, list[Path]]:
  ann = data / name / "annotations" / "train.json"
  images = sorted((data / name / "images").glob("train_*.jpg"))
  return ann, images


def _train_on(b: Battery, d: Path, damage: Callable[[Path], None], *overrides: str,
              skip: str | None = None, names: tuple[str, ...] = (), fresh: bool = False,
              num_steps: int = BASE_STEPS + 2) -> tuple[Run, Outcome, Path]:
  """Damage a copy of the data; train on it, resuming a copy of the base run (so nothing is
  recompiled) or, with `fresh`, from nothing for `num_steps` (0: read and build only)."""
  data = b.copy_data(d)
  damage(data)
  # A fresh run reads and builds only: it needs no compiled steps (and no base run).
  wd = d / "wd" if fresh else b.copy_base(d)
  w = Witness(REPO, data, b.data, *(() if fresh else (b.base(),)), workdir=wd)
  r = b.train(wd, *overrides, data=data, num_steps=num_steps)
  def nothing_skipped():
    if re.search(r"skipped [1-9]", r.log) or "skipping a training sample" in r.log:
      return "something was skipped"
    return None if "skipped 0 (none)" in r.log else "no data report"
  return r, classify(r, witness=w, prog="posebh-train: ", names=names, skip=skip,
                     correct=nothing_skipped if skip is None else None), data


_SAMPLE_SKIP = r"skipping a training sample: [^\n]*\n(?:.|\n)*?(\d+) training sample\(s\) " \
               r"skipped for an unusable image[^\n]*"


@case(7, "correct")
def train_non_utf8_file_name(b: Battery, d: Path) -> Outcome:
  def damage(data):
    # Every synth_coco training image gets a Latin-1 name, so the steps surely read some.
    ann, images = _coco_train(data)
    doc = json.loads(ann.read_text())
    by_name = {i["file_name"]: i for i in doc["images"]}
    for k, p in enumerate(images):
      raw = os.path.join(os.fsencode(p.parent), b"caf\xe9_%d\xff.jpg" % k)
      os.rename(os.fsencode(p), raw)
      by_name[p.name]["file_name"] = os.path.basename(os.fsdecode(raw))
    ann.write_text(json.dumps(doc))  # Surrogate escapes: they decode to the same str.
  return _train_on(b, d, damage)[1]


@case(7, "correct")
def infer_non_utf8_file_name(b: Battery, d: Path) -> Outcome:
  folder = d / "images"
  folder.mkdir()
  _, images = _coco_train(b.copy_data(d))
  raw = os.path.join(os.fsencode(folder), b"caf\xe9_\xff.jpg")
  shutil.copyfile(images[0], os.fsdecode(raw))
  w = Witness(REPO, b.base(), folder)
  r = b.infer(f"--images={folder}", f"--out={d / 'out'}")

  def check():
    got = sorted(os.listdir(os.fsencode(d / "out")))
    return None if got == [b"caf\xe9_\xff.json", b"caf\xe9_\xff.png"] else f"wrote {got}"
  return classify(r, witness=w, prog="posebh-infer: ", correct=check)


def _truncate(p: Path, frac: float = 0.5) -> None:
  raw = p.read_bytes()
  p.write_bytes(raw[: int(len(raw) * frac)])


@case(8, "counted skip")
def train_truncated_jpegs(b: Battery, d: Path) -> Outcome:
  def damage(data):
    for p in _coco_train(data)[1]:
      _truncate(p, 2 / 3)
  return _train_on(b, d, damage, "--config.data.max_bad_images=-1", skip=_SAMPLE_SKIP)[1]


@case(8, "counted skip")
def infer_truncated_jpeg(b: Battery, d: Path) -> Outcome:
  folder = d / "images"
  folder.mkdir()
  _, images = _coco_train(b.copy_data(d))
  for p in images[:2]:
    shutil.copyfile(p, folder / p.name)
  _truncate(folder / images[0].name)
  w = Witness(REPO, b.base(), folder)
  r = b.infer(f"--images={folder}", f"--out={d / 'out'}")
  out = classify(r, witness=w, prog="posebh-infer: ", names=(images[0].name,),
                 skip=rf"[^\n]*{images[0].name}[^\n]*(truncated|cannot decode)[^\n]*")
  if out.cls == "counted skip" and not (d / "out" / (images[1].stem + ".json")).exists():
    return Outcome("silent", "the good image was not written")
  return out


@case(8, "clear error")
def eval_truncated_jpeg(b: Battery, d: Path) -> Outcome:
  data = b.copy_data(d)
  val = sorted((data / "synth_coco" / "images").glob("val_*.jpg"))[0]
  _truncate(val)
  w = Witness(REPO, b.base(), own=(d / "eval_out",))
  r = b.eval(data)
  return classify(r, witness=w, prog="posebh-eval: ", names=(str(val),))


@case(9, "counted skip")
def train_zero_byte_images(b: Battery, d: Path) -> Outcome:
  def damage(data):
    for p in _coco_train(data, "synth_aic")[1]:
      p.write_bytes(b"")
  return _train_on(b, d, damage, "--config.data.max_bad_images=-1", skip=_SAMPLE_SKIP)[1]


@case(9, "clear error")
def train_bad_images_over_the_limit(b: Battery, d: Path) -> Outcome:
  def damage(data):
    for p in _coco_train(data)[1]:
      _truncate(p)
  return _train_on(b, d, damage, "--config.data.max_bad_images=2",
                   names=("more than data.max_bad_images=2",))[1]


@case(9, "counted skip")
def train_missing_image_files(b: Battery, d: Path) -> Outcome:
  def damage(data):
    for p in _coco_train(data, "synth_ap10k")[1][:5]:
      p.unlink()
  return _train_on(b, d, damage, skip=r"synth_ap10k/annotations/train\.json: kept \d+ "
                   r"instances; skipped 5 \([^)]*\)", fresh=True, num_steps=0)[1]


@case(10, "counted skip")
def train_image_smaller_than_annotated(b: Battery, d: Path) -> Outcome:
  import cv2
  import numpy as np

  def damage(data):
    for p in _coco_train(data)[1]:
      cv2.imwrite(str(p), np.zeros((1, 1, 3), np.uint8))
  return _train_on(b, d, damage, "--config.data.max_bad_images=-1", skip=_SAMPLE_SKIP)[1]


# === Item 11: annotation files =================================================================

def _bad_annotation(b: Battery, d: Path, edit: Callable[[Path], None], names=(), skip=None
                    ) -> Outcome:
  ann_path = []

  def damage(data):
    ann = _coco_train(data)[0]
    ann_path.append(ann)
    edit(ann)
  r, out, _ = _train_on(b, d, damage, fresh=True, num_steps=0, skip=skip,
                        names=tuple(n.format(ann=ann_path[0]) if ann_path else n for n in names))
  if out.cls == "unclear error" and ann_path and all(
      n.format(ann=ann_path[0]) in r.last for n in names):
    out = Outcome("clear error", r.last)
  return out


def _first_annotation(ann: Path, **kw) -> None:
  doc = json.loads(ann.read_text())
  doc["annotations"][0].update(kw)
  ann.write_text(json.dumps(doc))


@case(11, "clear error")
def ann_non_utf8_bytes(b: Battery, d: Path) -> Outcome:
  def edit(ann):
    text = ann.read_bytes()
    at = text.index(b'"images"')
    ann.write_bytes(text[:at + 1] + b"\xe9" + text[at + 1:])
  return _bad_annotation(b, d, edit, names=("{ann}", "not UTF-8"))


@case(11, "clear error")
def ann_truncated_json(b: Battery, d: Path) -> Outcome:
  return _bad_annotation(b, d, lambda ann: _truncate(ann), names=("{ann}",))


@case(11, "clear error")
def ann_json_list_not_object(b: Battery, d: Path) -> Outcome:
  return _bad_annotation(b, d, lambda ann: ann.write_text("[1, 2, 3]"), names=("{ann}",))


@case(11, "clear error")
def ann_empty_file(b: Battery, d: Path) -> Outcome:
  return _bad_annotation(b, d, lambda ann: ann.write_text(""), names=("{ann}",))


@case(11, "clear error")
def ann_keypoints_wrong_length(b: Battery, d: Path) -> Outcome:
  return _bad_annotation(b, d, lambda ann: _first_annotation(ann, keypoints=[1, 2, 2, 4, 5]),
                         names=("{ann}", "keypoints"))


@case(11, "counted skip")
def ann_negative_box(b: Battery, d: Path) -> Outcome:
  return _bad_annotation(b, d, lambda ann: _first_annotation(ann, bbox=[10, 10, -5, 20]),
                         skip=r"synth_coco/annotations/train\.json: kept \d+ instances; "
                              r"skipped 1 \([^)]*\)")


@case(11, "counted skip")
def ann_box_not_numbers(b: Battery, d: Path) -> Outcome:
  return _bad_annotation(b, d, lambda ann: _first_annotation(ann, bbox="wide"),
                         skip=r"synth_coco/annotations/train\.json: kept \d+ instances; "
                              r"skipped 1 \([^)]*\)")


def _mpii(b: Battery, d: Path, edit: Callable[[list], None], *, skip=None, names=(),
          raw: bool = False) -> Outcome:
  root = d / "samples"
  shutil.copytree(SHARED / "data" / "samples", root)
  ann = root / "mpii" / "test_mpii.json"
  entries = json.loads(ann.read_text())
  edit(entries)
  if raw:
    text = json.dumps(entries).encode()
    at = text.index(b'"image"')
    ann.write_bytes(text[:at + 1] + b"\xe9" + text[at + 1:])
  else:
    ann.write_text(json.dumps(entries))
  wd = d / "wd"
  w = Witness(REPO, root, own=(wd,))
  r = run_module("posebh_jax.main_train", "--config=configs/samples.py", f"--workdir={wd}",
                 f"--config.data.root={root}", "--config.train.num_steps=0",
                 "--config.train.eval_at_end=False")
  return classify(r, witness=w, prog="posebh-train: ", names=tuple(
      n.format(ann=ann) for n in names), skip=skip)


@case(11, "clear error", needs_shared=True)
def mpii_image_null(b: Battery, d: Path) -> Outcome:
  return _mpii(b, d, lambda e: e[1].update(image=None), names=("{ann}: entry 1: 'image'",))


@case(11, "clear error", needs_shared=True)
def mpii_non_utf8_bytes(b: Battery, d: Path) -> Outcome:
  return _mpii(b, d, lambda e: None, raw=True, names=("{ann}: not UTF-8",))


@case(11, "counted skip", needs_shared=True)
def mpii_scale_1e_minus_9(b: Battery, d: Path) -> Outcome:
  return _mpii(b, d, lambda e: e[0].update(scale=1e-9),
               skip=r"test_mpii\.json: kept \d+ instances; skipped 1 \(implausible scale: 1\)")


@case(11, "counted skip", needs_shared=True)
def mpii_scale_1e9(b: Battery, d: Path) -> Outcome:
  return _mpii(b, d, lambda e: e[0].update(scale=1e9),
               skip=r"test_mpii\.json: kept \d+ instances; skipped 1 \(implausible scale: 1\)")


# === Item 12: posebh-infer boxes ===============================================================

def _infer_boxes(b: Battery, d: Path, boxes, *, names=(), skip=None) -> Outcome:
  _, images = _coco_train(b.copy_data(d))
  (d / "boxes.json").write_text(boxes if isinstance(boxes, str) else
                                json.dumps({images[0].name: boxes}))
  w = Witness(REPO, b.base(), d / "data")
  r = b.infer(f"--images={images[0]}", f"--boxes={d / 'boxes.json'}", f"--out={d / 'out'}")
  return classify(r, witness=w, prog="posebh-infer: ", skip=skip, names=tuple(
      n.format(boxes=d / "boxes.json", image=images[0]) for n in names))


@case(12, "counted skip")
def infer_box_wholly_outside(b: Battery, d: Path) -> Outcome:
  return _infer_boxes(b, d, [[10, 10, 40, 60], [5000, 40, 90, 120]],
                      skip=r"[^\n]*box 1 \[5000, 40, 90, 120\] lies wholly outside[^\n]*")


@case(12, "clear error")
def infer_boxes_not_json(b: Battery, d: Path) -> Outcome:
  return _infer_boxes(b, d, '{"x.jpg": [[1, 2, 3, 4]', names=("{boxes}", "not valid JSON"))


@case(12, "clear error")
def infer_box_zero_width(b: Battery, d: Path) -> Outcome:
  return _infer_boxes(b, d, [[10, 10, 0, 50]], names=("box 0", "width and height"))


@case(12, "clear error")
def infer_missing_image(b: Battery, d: Path) -> Outcome:
  w = Witness(REPO, b.base())
  r = b.infer(f"--images={d / 'nope.jpg'}", f"--out={d / 'out'}")
  return classify(r, witness=w, prog="posebh-infer: ", names=(str(d / "nope.jpg"),))


# === Items 13-15: hostile or broken .pth files through posebh-convert ==========================

def _pth_case(b: Battery, d: Path, write: Callable[[Path], None], names: tuple[str, ...]
              ) -> Outcome:
  pth = d / "model.pth"
  write(pth)
  canary = d / "pwned"
  w = Witness(REPO, d, own=(d / "out",))
  r = b.convert(d / "out", pth=pth)
  out = classify(r, witness=w, prog="posebh-convert: ", names=(str(pth), *names))
  if canary.exists():
    return Outcome("data lost", "the pickle ran code")
  if (d / "out").exists():
    return Outcome("data lost", "a partial output was left")
  return out


def _pth_helpers():
  import test_convert as t
  return t


@case(13, "clear error")
def pth_stride0_bomb(b: Battery, d: Path) -> Outcome:
  import numpy as np
  t = _pth_helpers()
  return _pth_case(b, d, lambda p: t._write_pth(p, t._tensor_pickle(
      "0", 8, 0, (1 << 29,), (0,)), {"0": np.zeros(8, np.float32).tobytes()}),
      ("more than its storage",))


@case(13, "clear error")
def pth_many_views(b: Battery, d: Path) -> Outcome:
  import numpy as np
  t = _pth_helpers()
  n = 1 << 16
  items = b"".join(t._str(f"t{i}") + t._tensor_body("0", n, 0, (n,), (1,)) for i in range(10))
  return _pth_case(b, d, lambda p: t._write_pth(p, b"\x80\x02}(" + items + b"u.", {
      "0": np.zeros(n, np.float32).tobytes()}), ("views",))


@case(13, "clear error")
def pth_zip_bomb(b: Battery, d: Path) -> Outcome:
  import zipfile
  t = _pth_helpers()
  n = 16 << 20

  def write(p):
    with zipfile.ZipFile(p, "w") as z:
      z.writestr("archive/data.pkl", t._tensor_pickle("0", n, 0, (n,), (1,)))
      z.writestr("archive/byteorder", "little")
      z.writestr("archive/data/0", bytes(4 * n), compress_type=zipfile.ZIP_DEFLATED)
  return _pth_case(b, d, write, ("expands from",))


@case(14, "correct")
def pth_build_poisoning_in_one_process(b: Battery, d: Path) -> Outcome:
  # A notebook: a hostile load, then a legitimate one in the same process.
  t = _pth_helpers()
  import numpy as np
  t._write_pth(d / "poison.pth", b"\x80\x02ctorch\nFloatStorage\n}" + t._str("dtype")
               + t._str("x") + b"sb.")
  t._write_pth(d / "good.pth", t._tensor_pickle("0", 24, 2, (3, 4), (1, 3)),
               {"0": np.arange(24, dtype=np.float32).tobytes()})
  code = ("import sys\nfrom posebh_jax.convert.pth_reader import load_pth\n"
          f"try:\n  load_pth({str(d / 'poison.pth')!r})\nexcept ValueError as e:\n"
          "  print('refused:', e)\n"
          f"t = load_pth({str(d / 'good.pth')!r})['t']\n"
          "print('later load:', t.dtype, t.shape, float(t[0, 0]))\n")
  w = Witness(REPO, d)
  r = Run(*_python(code))

  def check():
    return None if "refused:" in r.out and "later load: float32 (3, 4) 2.0" in r.out \
        else r.out[-300:]
  return classify(r, witness=w, correct=check,
                  right="refused; a later load in the same process is unaffected")


def _python(code: str) -> tuple:
  cmd = [sys.executable, "-c", code]
  t = time.time()
  p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  return cmd, p.returncode, p.stdout, p.stderr, time.time() - t


@case(15, "clear error")
def pth_negative_offset(b: Battery, d: Path) -> Outcome:
  import numpy as np
  t = _pth_helpers()
  return _pth_case(b, d, lambda p: t._write_pth(p, t._tensor_pickle("0", 8, -1, (2,), (1,)), {
      "0": np.zeros(8, np.float32).tobytes()}), ("offset -1",))


@case(15, "clear error")
def pth_forbidden_global(b: Battery, d: Path) -> Outcome:
  t = _pth_helpers()
  pkl = b"\x80\x02cos\nsystem\n" + t._tuple(t._str(f"touch {d / 'pwned'}")) + b"R."
  return _pth_case(b, d, lambda p: t._write_pth(p, pkl), ("forbidden global 'os.system'",))


@case(15, "clear error")
def pth_not_a_zip(b: Battery, d: Path) -> Outcome:
  return _pth_case(b, d, lambda p: p.write_bytes(b"\x80\x02}q\x00."), ("zip",))


@case(15, "clear error")
def pth_truncated_zip(b: Battery, d: Path) -> Outcome:
  import numpy as np
  t = _pth_helpers()

  def write(p):
    t._write_pth(p, t._tensor_pickle("0", 4096, 0, (4096,), (1,)),
                 {"0": np.zeros(4096, np.float32).tobytes()})
    _truncate(p, 0.6)
  return _pth_case(b, d, write, ())


@case(15, "clear error")
def pth_missing_file(b: Battery, d: Path) -> Outcome:
  return _pth_case(b, d, lambda p: None, ())


@case(15, "clear error", needs_shared=True)
def pth_of_another_model(b: Battery, d: Path) -> Outcome:
  import numpy as np
  t = _pth_helpers()
  return _pth_case(b, d, lambda p: t._write_pth(
      p, b"\x80\x02}" + t._str("state_dict") + b"}" + t._str("backbone.pos_embed")
      + t._tensor_body("0", 4, 0, (2, 2), (2, 1)) + b"ss.",
      {"0": np.zeros(4, np.float32).tobytes()}), ())


# === Running ===================================================================================

def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="comma-separated case names")
  parser.add_argument("--list", action="store_true", help="list the cases and exit")
  parser.add_argument("--root", default="", help="where the shared inputs and cases go")
  parser.add_argument("--keep", action="store_true", help="keep --root's files at the end")
  args = parser.parse_args()
  if args.list:
    for c in CASES.values():
      print(f"{c.item:>2}  {c.name:<40} expected: {c.expected}")
    return 0
  names = [n for n in args.only.split(",") if n] or list(CASES)
  unknown = [n for n in names if n not in CASES]
  if unknown:
    parser.error(f"unknown cases {unknown}; see --list")
  root = Path(args.root or tempfile.mkdtemp(prefix="fault_battery_")).resolve()
  battery = Battery(root)
  counts: collections.Counter = collections.Counter()
  bad = []
  t0 = time.time()
  try:
    for n in names:
      c = CASES[n]
      t = time.time()
      if c.needs_shared and not SHARED.is_dir():
        out = Outcome("not run", f"needs {SHARED}")
      else:
        d = battery.cases / n
        if d.exists():
          shutil.rmtree(d)
        d.mkdir(parents=True)
        try:
          out = c.fn(battery, d)
        except Exception as e:  # The battery's own failure, reported as such.
          out = Outcome("not run", f"battery error: {type(e).__name__}: {e}"[:300])
      counts[out.cls] += 1
      flag = "" if out.cls == c.expected else f"  (expected {c.expected})"
      if out.cls not in ACCEPTABLE or out.cls != c.expected:
        bad.append(n)
      detail = out.detail.replace(str(root), "<root>")[:220]
      print(f"{c.item:>2} {n:<40} {out.cls:<13} {time.time() - t:5.0f}s  {detail}{flag}",
            flush=True)
  finally:
    if not args.keep and not args.root:
      shutil.rmtree(root, ignore_errors=True)
  print(f"\n{len(names)} cases in {time.time() - t0:.0f} s: " + ", ".join(
      f"{k} {counts[k]}" for k in CLASSES if counts[k]))
  if bad:
    print(f"not acceptable or not as expected: {', '.join(bad)}")
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
