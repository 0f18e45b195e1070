"""Set-up pieces every trainer shares: tokenizer, model config, train state, stage loading.

  setup_tokenizer      config.tokenizer.path, else WORKDIR/tokenizer.model (resume),
                       else a previous stage's, else one trained on the training text
  resolve_model_config the TransformerConfig, its vocabulary tied to the tokenizer's,
                       recorded in WORKDIR/config.json for the next stage
  state_sharding       shardings of a TrainState, derived from the model's annotations
  init_train_state     a TrainState created directly in its shardings
  load_stage_params    (model config, params, tokenizer) of a finished SFT/RM/PPO run
  quiet_library_logs   keeps INFO logs to this run's own lines
  check_finite         stops the run when a step saw a NaN/inf loss or gradient
  per_step_rng         the step's PRNG key, from the checkpointed run key
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging as logging_lib
import os
import tempfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from rlhf_jax import checkpoint, optim, sharding
from rlhf_jax.data import formats, pipeline
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.errors import ConfigError, UserError
from rlhf_jax.models import heads
from rlhf_jax.models.transformer import TransformerConfig

TOKENIZER_FILE = "tokenizer.model"
CONFIG_FILE = "config.json"

# Which network a stage's params belong to (PPO's exported params are its policy).
STAGE_MODELS = {"sft": heads.PolicyModel, "rm": heads.RewardModel, "ppo": heads.PolicyModel}

# Model fields a stage sets for itself when its architecture comes from a
# checkpoint (how to compute, not what); every other field is the checkpoint's.
_RUNTIME_FIELDS = ("dtype", "remat")


def is_main() -> bool:
  return jax.process_index() == 0


class _QuietLibraries(logging_lib.Filter):
  """Drops the INFO chatter of Orbax, grain and TensorFlow Datasets (dozens of
  lines per checkpoint); their warnings and errors still show."""
  _PATHS = (f"{os.sep}orbax{os.sep}", f"{os.sep}grain{os.sep}",
            f"{os.sep}tensorflow_datasets{os.sep}")

  def filter(self, record: logging_lib.LogRecord) -> bool:
    return record.levelno >= logging_lib.WARNING or not any(
        p in record.pathname for p in self._PATHS)


def quiet_library_logs() -> None:
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """WORKDIR/config.json: the resolved config (model fields as actually built)."""
  if is_main():
    path = checkpoint.run_path(workdir, CONFIG_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))
    tmp.replace(path)


def load_tokenizer(path: str) -> Tokenizer:
  """A sentencepiece model from a local or remote (gs://) path."""
  if "://" not in str(path):
    return Tokenizer.load(path)
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, TOKENIZER_FILE)
    epath.Path(path).copy(epath.Path(local))
    return Tokenizer.load(local)


def save_tokenizer(tokenizer: Tokenizer, path: str) -> None:
  if "://" not in str(path):
    return tokenizer.save(path)
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, TOKENIZER_FILE)
    tokenizer.save(local)
    epath.Path(local).copy(epath.Path(path), overwrite=True)


# --------------------------------------------------------------------------------
# Tokenizer and model config
# --------------------------------------------------------------------------------


def setup_tokenizer(config, workdir: str, previous_stage: str = "") -> Tokenizer:
  """The run's tokenizer, also saved as WORKDIR/tokenizer.model.

  In order: `config.tokenizer.path`; the workdir's own file (a resumed run keeps
  its vocabulary); the tokenizer of `previous_stage` (e.g. the SFT run an RM is
  initialised from); else a sentencepiece model trained in memory on up to
  `tokenizer.train_max_texts` training texts. Process 0 trains and writes it and
  the others read it back (the workdir is shared between hosts), so every host
  tokenizes with the very same model.
  """
  saved = str(checkpoint.run_path(workdir, TOKENIZER_FILE))
  source = config.tokenizer.path
  if not source and previous_stage:
    source = str(checkpoint.run_path(previous_stage, TOKENIZER_FILE))
    if not epath.Path(source).exists():
      raise UserError(f"{previous_stage} has no {TOKENIZER_FILE}: is it a finished run?")
  if source:
    if not epath.Path(source).exists():
      raise ConfigError(f"config.tokenizer.path: {source} does not exist")
    tokenizer = load_tokenizer(source)
    if is_main() and str(checkpoint.run_path(source)) != saved:
      save_tokenizer(tokenizer, saved)
    return tokenizer
  if not epath.Path(saved).exists() and is_main():
    if not config.data.train_files:
      raise ConfigError("config.data.train_files: no files given (the tokenizer is "
                        "trained on them when config.tokenizer.path is '')")
    texts = formats.example_texts(pipeline.read_examples(config.data))
    logging.info("training a %d-piece %s tokenizer on up to %d training texts",
                 config.tokenizer.vocab_size, config.tokenizer.model_type,
                 config.tokenizer.train_max_texts)
    tokenizer = Tokenizer.train(itertools.islice(texts, config.tokenizer.train_max_texts),
                                config.tokenizer.vocab_size,
                                model_type=config.tokenizer.model_type)
    epath.Path(saved).parent.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, saved)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("tokenizer")
  return load_tokenizer(saved)


def _config_value(value: Any) -> Any:
  return np.dtype(value).name if isinstance(value, np.dtype) else value


def record_model_config(config, model_config: TransformerConfig) -> None:
  """Writes the fields of the model actually built back into `config.model`."""
  for field in dataclasses.fields(model_config):
    if field.name in config.model:
      config.model[field.name] = _config_value(getattr(model_config, field.name))


def resolve_model_config(config, tokenizer: Tokenizer, workdir: str,
                         base: TransformerConfig | None = None) -> TransformerConfig:
  """The model to build, with the tokenizer's vocabulary.

  A tokenizer with more pieces than `config.model.vocab_size` is an error (its
  ids would index past the embedding); one with fewer (sentencepiece may stop
  short of the requested size on a small corpus) shrinks the model's vocabulary
  to match. With `base` (the model of a previous stage's checkpoint, or of a
  pretrained model) the architecture is that one and only the compute settings
  come from `config`; its vocabulary may be larger than the tokenizer's
  (pretrained embeddings are often padded to a round size).
  The resolved fields are written to WORKDIR/config.json.
  """
  if base is not None:
    local = {k: getattr(TransformerConfig.from_config(config.model), k)
             for k in _RUNTIME_FIELDS}
    model_config = dataclasses.replace(base, **local)
  else:
    vocab = config.model.vocab_size
    if tokenizer.vocab_size > vocab:
      raise ConfigError(f"config.model.vocab_size: {vocab} is smaller than the "
                        f"tokenizer's {tokenizer.vocab_size} pieces")
    if tokenizer.vocab_size < vocab:
      logging.info("model vocabulary set to the tokenizer's %d pieces (config asked %d)",
                   tokenizer.vocab_size, vocab)
    model_config = dataclasses.replace(TransformerConfig.from_config(config.model),
                                       vocab_size=tokenizer.vocab_size)
  if model_config.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f"config.tokenizer.path: the tokenizer has {tokenizer.vocab_size} "
                      f"pieces, more than the {model_config.vocab_size} rows of the "
                      "model's embedding")
  record_model_config(config, model_config)
  write_config(config, workdir)
  return model_config


# --------------------------------------------------------------------------------
# Train state
# --------------------------------------------------------------------------------


def _boxed_init(model: nn.Module):
  return lambda rng: model.init(rng, jnp.ones((1, 8), jnp.int32))["params"]


def param_sharding(model: nn.Module, mesh) -> tuple[Any, Any]:
  """(abstract params with shardings, NamedShardings) from the model's logical axes."""
  boxed = jax.eval_shape(_boxed_init(model), jax.random.key(0))
  shardings = sharding.logical_to_shardings(boxed, mesh)
  return checkpoint.abstract_tree(nn.meta.unbox(boxed), shardings), shardings


def state_sharding(model: nn.Module, tx: optax.GradientTransformation, mesh
                   ) -> optim.TrainState:
  """A TrainState of NamedShardings: params from their logical annotations, the
  optimizer state mirroring them, scalars and the key replicated."""
  abstract_params, params = param_sharding(model, mesh)
  replicated = sharding.replicated(mesh)
  return optim.TrainState(
      step=replicated, params=params,
      opt_state=optim.opt_state_shardings(tx, abstract_params, params, replicated),
      rng=replicated, bad_step=replicated, bad_metric=replicated)


def abstract_state(model, tx, shardings: optim.TrainState, rng) -> optim.TrainState:
  shapes = jax.eval_shape(
      lambda r: optim.TrainState.create(nn.meta.unbox(_boxed_init(model)(r)), tx, r), rng)
  return checkpoint.abstract_tree(shapes, shardings)


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                     shardings: optim.TrainState, init_params: Any = None
                     ) -> optim.TrainState:
  """A fresh TrainState, created directly in `shardings` (no full copy anywhere).

  `init_params` (a subtree such as {'trunk': ...} from a previous stage) replaces
  the matching freshly initialised params before the optimizer state is built.
  """
  init_rng, run_rng = jax.random.split(rng)

  def create(init_rng, run_rng, init_params):
    params = nn.meta.unbox(_boxed_init(model)(init_rng))
    if init_params is not None:
      params = {**params, **init_params}
    return optim.TrainState.create(params, tx, run_rng)

  sub_shardings = None
  if init_params is not None:
    sub_shardings = {k: shardings.params[k] for k in init_params}
  return jax.jit(create, in_shardings=(None, None, sub_shardings),
                 out_shardings=shardings)(init_rng, run_rng, init_params)


def per_step_rng(run_rng: jax.Array, step: int) -> jax.Array:
  return jax.random.fold_in(run_rng, step)


def check_finite(state: optim.TrainState, loss_name: str, last_good: int | None,
                 workdir: str) -> None:
  """Raises NonFiniteError naming the first bad step and metric, if any.

  Reads two device scalars: called only at log and checkpoint steps.
  """
  bad_step, bad_metric = (int(x) for x in jax.device_get((state.bad_step, state.bad_metric)))
  if bad_step < 0:
    return
  metric = loss_name if bad_metric == optim.BAD_LOSS else "optim/grad_norm"
  kept = (f"the last good checkpoint is step {last_good} in "
          f"{checkpoint.run_path(workdir, checkpoint.CHECKPOINT_DIR)}" if last_good is not None
          else "no checkpoint was written")
  raise optim.NonFiniteError(
      f"step {bad_step}: {metric} is not finite (NaN or inf); the run stopped and "
      f"{kept} (try a lower optim.learning_rate or check the data)")


# --------------------------------------------------------------------------------
# Loading a previous stage
# --------------------------------------------------------------------------------


def read_run_config(workdir: str) -> dict:
  path = checkpoint.run_path(workdir, CONFIG_FILE)
  if not path.exists():
    raise UserError(f"{path} not found: {workdir} is not an rlhf_jax run directory")
  return json.loads(path.read_text())


def load_stage_params(workdir: str, mesh, model_cls: type | None = None
                      ) -> tuple[TransformerConfig, Any, Tokenizer]:
  """(model config, params, tokenizer) of a previous run, params in their shardings.

  Reads WORKDIR/config.json (the model as built), WORKDIR/tokenizer.model and the
  params: WORKDIR/params (exported at the end of the run, e.g. the RM with its
  normalised bias) or, for an unfinished run, its latest checkpoint. `model_cls`
  defaults to the network of the run's stage (sft/ppo: PolicyModel, rm:
  RewardModel); pass heads.ValueModel to load an RM as a critic (same tree).
  """
  run_config = read_run_config(workdir)
  model_config = TransformerConfig.from_config(run_config["model"])
  model_cls = model_cls or STAGE_MODELS[run_config["stage"]]
  abstract_params, _ = param_sharding(model_cls(model_config), mesh)
  try:
    params = checkpoint.restore_params(workdir, abstract_params)
  except FileNotFoundError as e:
    raise UserError(str(e)) from None
  tokenizer = load_tokenizer(str(checkpoint.run_path(workdir, TOKENIZER_FILE)))
  return model_config, params, tokenizer
