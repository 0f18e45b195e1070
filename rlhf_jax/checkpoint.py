"""Orbax checkpoints: the train state for exact resume, and exported final params.

Layout in a run's workdir:

  checkpoints/<step>/params   the params of a TrainState           (StandardSave)
  checkpoints/<step>/train    the rest: step, opt_state, rng, ...   (StandardSave)
  checkpoints/<step>/extra    host-side state as JSON: data iterator position,
                              pending metrics, KL controller, ...   (JsonSave)
  params/                     the final params the next stage loads (StandardSave)

Params are their own item so that a later stage (or a notebook) can restore
just them, straight into their shardings, without the optimizer state. Saves are
asynchronous: the step loop continues while the arrays are written. Orbax writes
each step into a temporary directory and renames it when complete, so a run
killed mid-save resumes from the last complete step; leftover temporary
directories are removed when the manager opens. Nothing is pickled.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = "checkpoints"
PARAMS_DIR = "params"


def run_path(workdir: str, *parts: str) -> epath.Path:
  """A path in a run's workdir, local or remote (gs://, through etils.epath)."""
  root = workdir if "://" in str(workdir) else os.path.abspath(workdir)
  return epath.Path(root).joinpath(*parts)


def abstract_tree(tree: Any, shardings: Any = None) -> Any:
  """ShapeDtypeStructs (with shardings) describing `tree`: a restore target."""
  if shardings is None:
    shardings = jax.tree.map(lambda x: getattr(x, "sharding", None), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def split_state(state) -> dict[str, Any]:
  """A TrainState as checkpoint items: {'params': params, 'train': everything else}."""
  return {"params": state.params, "train": state.replace(params=None)}


def join_state(items: dict[str, Any]):
  return items["train"].replace(params=items["params"])


class Checkpointer:
  """An Orbax CheckpointManager over WORKDIR/checkpoints, keeping the last `keep`.

  Items are named pytrees of arrays (e.g. `split_state(state)`) plus one JSON
  dict `extra`. Every process must call `save` / `restore` (Orbax coordinates the
  hosts); the trainer decides when, so `save` always writes.
  """

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True,
               item_names: tuple[str, ...] = ("params", "train")):
    self.item_names = tuple(item_names)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True, create=True)
    self.directory = str(run_path(workdir, CHECKPOINT_DIR))
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=self.item_names + ("extra",))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, items: dict[str, Any], extra: dict) -> None:
    """Starts writing `items` and `extra` as step `step` (returns before it ends)."""
    args = {name: ocp.args.StandardSave(items[name]) for name in self.item_names}
    self._manager.save(int(step), args=ocp.args.Composite(
        **args, extra=ocp.args.JsonSave(extra)), force=True)

  def restore(self, step: int, abstract_items: dict[str, Any]) -> tuple[dict, dict]:
    """(items, extra) of `step`; arrays land in the shardings of `abstract_items`
    (ShapeDtypeStructs, see `abstract_tree`). Items not named are not read."""
    args = {name: ocp.args.StandardRestore(abstract_items[name]) for name in abstract_items}
    restored = self._manager.restore(int(step), args=ocp.args.Composite(
        **args, extra=ocp.args.JsonRestore()))
    return {name: restored[name] for name in abstract_items}, dict(restored["extra"])

  def wait(self) -> None:
    """Blocks until the last save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def save_params(workdir: str, params: Any) -> str:
  """Writes the final params to WORKDIR/params (replacing any), synchronously.

  This is what the next stage loads: e.g. the RM's params after its reward
  normalisation, which differ from the last training checkpoint.
  """
  path = run_path(workdir, PARAMS_DIR)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, params, force=True)
    checkpointer.wait_until_finished()
  return str(path)


def has_params(workdir: str) -> bool:
  return run_path(workdir, PARAMS_DIR).exists()


def restore_params(workdir: str, abstract_params: Any) -> Any:
  """Params of a finished run (WORKDIR/params), or else of its latest checkpoint,
  restored straight into the shardings of `abstract_params`."""
  if has_params(workdir):
    with ocp.StandardCheckpointer() as checkpointer:
      return checkpointer.restore(run_path(workdir, PARAMS_DIR), abstract_params)
  directory = run_path(workdir, CHECKPOINT_DIR)
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_names=("params",))
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"{workdir} has neither {PARAMS_DIR}/ nor a checkpoint")
    return manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))["params"]
  finally:
    manager.close()
