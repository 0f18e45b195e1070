"""One PPO iteration, split into rollout / scoring / update: rlhf_jax vs. HF TRL.

The shape of DESIGN.md section 8: a GPT-2-shaped policy (4 layers, d_model 256,
4 heads, d_ff 1024, vocab 8000), a value network and a reward model of the same
shape, batch 32 prompts of 64 tokens, 64 new tokens at temperature 0.7, 4 PPO
epochs over the batch in one minibatch (4 optimizer steps), float32. Random
weights: responses almost never hit the stop token, so both sides generate the
full 64 tokens.

    python benchmarks/ppo.py --impl jax                        # rlhf_jax only
    python benchmarks/ppo.py                                   # and TRL, alternating
    python benchmarks/ppo.py --trl_python /tmp/trlvenv/bin/python   # TRL elsewhere
    python benchmarks/ppo.py --impl trl                        # TRL only (JSON)
    python benchmarks/ppo.py --d_model 512 --n_layers 8        # a larger shape

TRL's PPO trainer was removed in trl 1.13; the last release with it is 1.12.0
(`trl.experimental.ppo`). It installs into the project's venv beside its torch
and transformers (`pip install -e '.[bench]'`); or, in a venv of its own,

    python3 -m venv /tmp/trlvenv && /tmp/trlvenv/bin/pip install torch==2.13.0 trl==1.12.0

and pass --trl_python. With both sides, TRL runs in a persistent worker process
(`--impl trl_worker`: one iteration per "step" line on stdin, its times as one
JSON line on stdout), so the two alternate iteration by iteration (jax, trl,
jax, trl, ...) and a change in the machine's load hits both alike.

Phases (the same on both sides; TRL's are measured by wrapping its functions):
  rollout  sampling the 64 new tokens (KV cache on both sides)
  scoring  the no-grad forwards: reference policy, value, reward (both sides
           keep the sampler's log-probs for the policy), plus rewards and GAE
  update   4 epochs of policy + value forward/backward and optimizer steps
Reported: the median over the timed iterations (after the --warmup ones, which
include compilation and TRL's first-call set-up), tokens/s per phase, and MFU
when --peak_tflops is given (model FLOPs: 2 x params per forward token, 6 x
params per trained token). benchmarks/compare.py runs this side by side with
the RM step and sampling comparisons.
"""
import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

SHAPE = dict(vocab=8000, d_model=256, n_layers=4, n_heads=4, d_ff=1024)
SHAPE_FLAGS = tuple(SHAPE)
RUN_FLAGS = ("batch", "prompt_len", "new_tokens", "epochs", "minibatches", "warmup",
             "iterations", "peak_tflops", "torch_threads",
             "trl_keep_freed_memory") + SHAPE_FLAGS


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--impl", choices=("jax", "trl", "both", "trl_worker"), default="both")
  parser.add_argument("--trl_python", default=default_trl_python(),
                      help="python of a venv with trl==1.12.0 (for --impl both); "
                      "default: this one if it has trl, else none (TRL skipped)")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--epochs", type=int, default=4)
  parser.add_argument("--minibatches", type=int, default=1)
  parser.add_argument("--warmup", type=int, default=1, help="untimed iterations")
  parser.add_argument("--iterations", type=int, default=3, help="timed iterations")
  parser.add_argument("--dtype", default="float32", help="rlhf_jax compute dtype")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="device peak TFLOP/s for MFU (0: not reported)")
  parser.add_argument("--torch_threads", type=int, default=0,
                      help="TRL's PyTorch intra-op threads (0: PyTorch's default)")
  parser.add_argument("--trl_keep_freed_memory", type=int, default=0,
                      help="1: give TRL's process the malloc settings rlhf_jax's "
                      "trainer uses on CPU (rlhf_jax/host_memory.py), to see how much "
                      "of the difference they make; 0 (default): TRL as it ships")
  for name, default in SHAPE.items():
    parser.add_argument(f"--{name}", type=int, default=default, help="model shape")
  return parser.parse_args(argv)


def default_trl_python() -> str:
  import importlib.util
  return sys.executable if importlib.util.find_spec("trl") else ""


def run_flags(args, names=RUN_FLAGS) -> list[str]:
  """`args` back as command-line flags, for the TRL process."""
  return [f"--{k}={getattr(args, k)}" for k in names]


def param_count(vocab, d_model, n_layers, d_ff, max_len) -> int:
  """GPT-2: tied embeddings + learned positions + 4d^2 attention + 2 d d_ff MLP."""
  return n_layers * (4 * d_model * d_model + 2 * d_model * d_ff) + (vocab + max_len) * d_model


def summarize(name: str, times: dict[str, list[float]], args, params: int) -> dict:
  seq = args.prompt_len + args.new_tokens
  tokens = {"rollout": args.batch * args.new_tokens, "score": args.batch * seq,
            "update": args.epochs * args.batch * seq}
  # Model FLOPs: sampling = 1 forward per slot; scoring = 3 forwards (ref, value,
  # reward: what both implementations must do); update = policy + value fwd/bwd.
  flops = {"rollout": 2 * params * args.batch * seq, "score": 3 * 2 * params * args.batch * seq,
           "update": 2 * 6 * params * tokens["update"]}
  out = {"impl": name, "params": params}
  for phase in ("rollout", "score", "update"):
    t = statistics.median(times[phase])
    out[f"{phase}_s"] = t
    out[f"{phase}_tokens_per_s"] = tokens[phase] / t
    if args.peak_tflops:
      out[f"{phase}_mfu"] = flops[phase] / t / (args.peak_tflops * 1e12)
  out["iteration_s"] = statistics.median(
      [sum(v) for v in zip(times["rollout"], times["score"], times["update"])])
  # Process CPU seconds (all threads): on a machine shared with other jobs, wall
  # time also counts waiting for them; CPU time is the work each side did.
  for phase in ("rollout", "score", "update"):
    out[f"{phase}_cpu_s"] = statistics.median(times[f"{phase}_cpu"])
  out["iteration_cpu_s"] = statistics.median(
      [sum(v) for v in zip(times["rollout_cpu"], times["score_cpu"], times["update_cpu"])])
  return out


PHASE_KEYS = ("rollout", "score", "update", "rollout_cpu", "score_cpu", "update_cpu")


def clock() -> tuple[float, float]:
  return time.perf_counter(), time.process_time()


def phase_times(t0, t1, t2, t3) -> dict[str, float]:
  """One iteration's (wall, CPU) seconds per phase from four clock() readings."""
  phases = {"rollout": (t0, t1), "score": (t1, t2), "update": (t2, t3)}
  out = {k: b[0] - a[0] for k, (a, b) in phases.items()}
  out.update({k + "_cpu": b[1] - a[1] for k, (a, b) in phases.items()})
  return out


def log_iteration(name: str, it: int, times: dict, note: str = "") -> None:
  print(f"{name} iteration {it}: " + " ".join(
      f"{k} {times[k]:.2f}s ({times[k + '_cpu']:.2f} cpu-s)"
      for k in ("rollout", "score", "update")) + f" {note}", file=sys.stderr)


def record(times: dict[str, list[float]], iteration: dict[str, float]) -> None:
  for k in PHASE_KEYS:
    times[k].append(iteration[k])


# --------------------------------------------------------------------------------
# rlhf_jax
# --------------------------------------------------------------------------------


def build_jax(args):
  """(iteration, params): `iteration(it)` runs one rlhf_jax PPO iteration and
  returns its phase times (phase_times); the first one compiles."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np

  from rlhf_jax import optim, sampling, sharding
  from rlhf_jax.models import heads
  from rlhf_jax.models.transformer import TransformerConfig
  from rlhf_jax.steps import ppo as ppo_lib
  from rlhf_jax.steps import rollout as rollout_lib
  from rlhf_jax.trainers import common

  max_len = args.prompt_len + args.new_tokens
  cfg = TransformerConfig.from_config(dict(
      family="gpt2", vocab_size=args.vocab, d_model=args.d_model, n_layers=args.n_layers,
      n_heads=args.n_heads, n_kv_heads=args.n_heads, d_ff=args.d_ff, max_len=max_len,
      dtype=args.dtype))
  models = rollout_lib.Models(heads.PolicyModel(cfg), heads.ValueModel(cfg),
                              heads.RewardModel(cfg))
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  optim_cfg = ml_collections.ConfigDict(dict(
      learning_rate=1e-5, schedule="constant", warmup_steps=0, end_lr_fraction=0.0, b1=0.9,
      b2=0.999, eps=1e-5, weight_decay=0.0, grad_clip_norm=1.0))
  tx, _ = optim.make_optimizer(optim_cfg, total_steps=1000)
  up = ppo_lib.UpdateParams(epochs=args.epochs, minibatches=args.minibatches, temperature=0.7)
  stop = 3
  sp = sampling.SamplingParams(new_tokens=args.new_tokens, stop_token=stop, temperature=0.7)
  scoring = rollout_lib.ScoringParams(stop_token=stop, temperature=0.7)

  abstract_policy, policy_sh = common.param_sharding(models.policy, mesh)
  abstract_value, value_sh = common.param_sharding(models.value, mesh)
  replicated = sharding.replicated(mesh)
  batch_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  state_sh = ppo_lib.state_sharding(tx, tx, abstract_policy, abstract_value, policy_sh,
                                    value_sh, replicated, ema=False)
  import flax.linen as nn

  def init(model, seed, out):
    return jax.jit(lambda: nn.meta.unbox(model.init(
        jax.random.key(seed), jnp.ones((1, 8), jnp.int32))["params"]), out_shardings=out)()

  with jax.set_mesh(mesh):
    reference = init(models.policy, 0, policy_sh)
    reward = init(models.reward, 1, value_sh)
    state = jax.jit(lambda p, v: ppo_lib.init_state(p, v, tx, tx),
                    out_shardings=state_sh)(reference, init(models.value, 1, value_sh))
    fns = rollout_lib.make_rollout_fns(
        models, sp, scoring, params_sharding={"policy": policy_sh, "reference": policy_sh,
                                              "value": value_sh, "reward": value_sh},
        batch_sharding=batch_sh, replicated=replicated)
    update = ppo_lib.make_update(models.policy, models.value, tx, tx, up,
                                 state_sharding=state_sh, batch_sharding=batch_sh,
                                 replicated=replicated)
    rng = np.random.default_rng(0)
    prompts = jax.device_put(rng.integers(4, args.vocab, (args.batch, args.prompt_len),
                                          dtype=np.int32), batch_sh)
    prompt_mask = jax.device_put(np.ones((args.batch, args.prompt_len), np.int32), batch_sh)
  holder = {"state": state}

  def iteration(it: int) -> dict[str, float]:
    with jax.set_mesh(mesh):
      key = jax.random.key(it)
      state = holder.pop("state")
      t0 = clock()
      samples = jax.block_until_ready(fns.generate(state.policy, prompts, prompt_mask, key))
      t1 = clock()
      params = {"policy": state.policy, "reference": reference, "value": state.value,
                "reward": reward}
      batch, metrics = jax.block_until_ready(
          fns.score(params, prompts, prompt_mask, samples, np.float32(0.05)))
      t2 = clock()
      del params
      holder["state"], _ = jax.block_until_ready(update(state, batch, None, key))
      t3 = clock()
    times = phase_times(t0, t1, t2, t3)
    log_iteration("rlhf_jax", it, times,
                  f"response length {float(metrics['ppo/response_length']):.1f}")
    return times

  return iteration, cfg.param_count()


def jax_devices() -> str:
  import jax
  return f"{len(jax.devices())} x {jax.devices()[0].device_kind}"


def run_jax(args) -> dict:
  iteration, params = build_jax(args)
  times = {k: [] for k in PHASE_KEYS}
  for it in range(args.warmup + args.iterations):
    result = iteration(it)
    if it >= args.warmup:
      record(times, result)
  return dict(summarize("rlhf_jax", times, args, params), devices=jax_devices())


# --------------------------------------------------------------------------------
# TRL (run inside a venv with trl==1.12.0)
# --------------------------------------------------------------------------------


class StopWorker(Exception):
  """Raised inside TRL's train loop to end a worker that was told to stop."""


def build_trl(args, between: Callable[[Optional[dict]], None]):
  """A TRL PPOTrainer of the same shape, set up to run warmup + iterations PPO
  iterations when `.train()` is called; returns (trainer, versions).

  `between(times)` is called between iterations (inside TRL's loop, outside the
  timed spans): first with None before the first, then with each iteration's
  phase_times. A worker blocks in it until told to go on.
  """
  import torch
  import transformers
  import trl
  from datasets import Dataset
  from tokenizers import Tokenizer, models as tok_models
  from transformers import (GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel,
                            PreTrainedTokenizerFast, TrainerCallback)
  from trl.experimental.ppo import PPOConfig, PPOTrainer
  from trl.experimental.ppo import ppo_trainer as trl_ppo

  torch.manual_seed(0)
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  # A word-level tokenizer over made-up words: no download.
  vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3}
  vocab.update({f"w{i}": i for i in range(4, args.vocab)})
  tokenizer = PreTrainedTokenizerFast(
      tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>")),
      pad_token="<pad>", unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")
  config = GPT2Config(vocab_size=args.vocab, n_positions=args.prompt_len + args.new_tokens,
                      n_embd=args.d_model, n_layer=args.n_layers, n_head=args.n_heads,
                      n_inner=args.d_ff, pad_token_id=0, eos_token_id=3, bos_token_id=2,
                      num_labels=1)
  policy = GPT2LMHeadModel(config)
  ref = copy.deepcopy(policy)  # the SFT policy both start from
  value, reward = GPT2ForSequenceClassification(config), GPT2ForSequenceClassification(config)
  rng = torch.Generator().manual_seed(0)
  n = args.batch * (args.warmup + args.iterations)
  prompts = torch.randint(4, args.vocab, (n, args.prompt_len), generator=rng)
  train = Dataset.from_dict({"input_ids": prompts.tolist()})
  ppo_config = PPOConfig(
      output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, fp16=False,
      gradient_checkpointing=False, per_device_train_batch_size=args.batch // args.minibatches,
      gradient_accumulation_steps=args.minibatches, num_mini_batches=args.minibatches,
      num_ppo_epochs=args.epochs, local_rollout_forward_batch_size=args.batch,
      response_length=args.new_tokens, temperature=0.7, total_episodes=n,
      stop_token="eos", missing_eos_penalty=1.0, kl_coef=0.05, learning_rate=1e-5,
      num_sample_generations=0, report_to=[], save_strategy="no", logging_steps=1,
      disable_tqdm=True, seed=0)

  # Phase timers: wrap the functions TRL's train loop calls by name.
  spent = {"rollout": 0.0, "score": 0.0, "rollout_cpu": 0.0, "score_cpu": 0.0}

  def timed(fn, phase, only_no_grad=False):
    def wrapper(*a, **kw):
      if only_no_grad and torch.is_grad_enabled():
        return fn(*a, **kw)  # the update's forward, not scoring
      t, c = clock()
      try:
        return fn(*a, **kw)
      finally:
        spent[phase] += time.perf_counter() - t
        spent[phase + "_cpu"] += time.process_time() - c
    return wrapper

  trl_ppo.batch_generation = timed(trl_ppo.batch_generation, "rollout")
  trl_ppo.forward = timed(trl_ppo.forward, "score", only_no_grad=True)
  trl_ppo.get_reward = timed(trl_ppo.get_reward, "score")
  start = {}

  def finish() -> dict[str, float]:
    # Phase boundaries as clocks: rollout and scoring are the wrapped calls' time;
    # the update is the rest of the iteration (GAE, the epochs, logging, and the
    # previous iteration's clean-up, which TRL runs after on_step_end).
    (t0, s0), end, s1 = start["at"], clock(), dict(spent)
    t1 = (t0[0] + s1["rollout"] - s0["rollout"], t0[1] + s1["rollout_cpu"] - s0["rollout_cpu"])
    t2 = (t1[0] + s1["score"] - s0["score"], t1[1] + s1["score_cpu"] - s0["score_cpu"])
    return phase_times(t0, t1, t2, end)

  class Between(TrainerCallback):
    """Hands each finished iteration to `between`, then restarts the clocks (so
    time spent inside `between`, e.g. waiting for the next request, is not counted)."""

    def on_train_begin(self, *a, **kw):
      between(None)
      start["at"] = (clock(), dict(spent))

    def on_step_end(self, *a, **kw):
      between(finish())
      start["at"] = (clock(), dict(spent))

  trainer = PPOTrainer(args=ppo_config, processing_class=tokenizer, model=policy,
                       ref_model=ref, reward_model=reward, value_model=value,
                       train_dataset=train, eval_dataset=train.select(range(args.batch)),
                       callbacks=[Between()])
  versions = {"trl": trl.__version__, "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "torch_threads": torch.get_num_threads()}
  return trainer, versions


def run_trl(args) -> dict:
  """TRL alone, in this process: warmup + iterations, the median of the timed ones."""
  times = {k: [] for k in PHASE_KEYS}
  done = []

  def between(iteration):
    if iteration is not None:
      log_iteration("trl", len(done), iteration)
      if len(done) >= args.warmup:
        record(times, iteration)
      done.append(iteration)

  trainer, versions = build_trl(args, between)
  trainer.train()
  out = summarize("trl", times, args, trl_param_count(args))
  out["versions"] = versions
  return out


def trl_param_count(args) -> int:
  return param_count(args.vocab, args.d_model, args.n_layers, args.d_ff,
                     args.prompt_len + args.new_tokens)


def trl_worker(args) -> None:
  """Serves TRL iterations: a JSON line on stdout when ready and after each
  iteration; reads "step" (run the next iteration) or "stop" from stdin.

  Only protocol lines go to the real stdout: everything else that prints to it
  (TRL's and transformers' messages) is sent to stderr.
  """
  protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
  sys.stdout = sys.stderr
  versions = {}

  def between(iteration):
    message = iteration if iteration is not None else {"ready": True, "versions": versions}
    protocol.write(json.dumps(message) + "\n")
    command = sys.stdin.readline().strip()
    if command != "step":
      raise StopWorker(command)

  trainer, built_versions = build_trl(args, between)
  versions.update(built_versions)
  try:
    trainer.train()
  except StopWorker:
    pass


class TrlWorker:
  """Client of a `--impl trl_worker` process, started at construction (its set-up
  overlaps whatever the caller builds meanwhile); `wait_ready()` returns the
  worker's library versions, `step()` runs one TRL iteration there and returns
  its phase_times, `close()` ends it."""

  def __init__(self, python: str, args, iterations: int):
    cmd = [python, os.path.abspath(__file__), "--impl", "trl_worker"] + run_flags(
        argparse.Namespace(**{**vars(args), "warmup": 0, "iterations": iterations}))
    self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: never fills up
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1")
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self.log, text=True, env=env)
    self.versions = None

  def wait_ready(self) -> dict:
    if self.versions is None:
      self.versions = self._read()["versions"]
    return self.versions

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      self.proc.wait()
      self.log.seek(0)
      raise RuntimeError(f"TRL worker exited with code {self.proc.returncode}:\n"
                         f"{self.log.read()[-4000:]}")
    return json.loads(line)

  def step(self) -> dict[str, float]:
    self.wait_ready()
    self.proc.stdin.write("step\n")
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write("stop\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()
    self.log.close()


# --------------------------------------------------------------------------------


def print_table(rows: list[dict]) -> None:
  phases = ("rollout", "score", "update", "iteration")
  print(f"{'':10s}" + "".join(f"{p + ' s':>13s}" for p in phases)
        + "".join(f"{p + ' cpu-s':>17s}" for p in phases))
  for r in rows:
    print(f"{r['impl']:10s}" + "".join(f"{r[p + '_s']:13.2f}" for p in phases)
          + "".join(f"{r[p + '_cpu_s']:17.2f}" for p in phases))
  if len(rows) == 2:
    a, b = rows
    for unit in ("_s", "_cpu_s"):
      print(f"rlhf_jax speed-up over TRL ({'wall' if unit == '_s' else 'CPU'} time): "
            + ", ".join(f"{p} {b[p + unit] / a[p + unit]:.2f}x" for p in phases))


def run_both(args) -> list[dict]:
  """rlhf_jax in this process and TRL in a worker, iteration by iteration."""
  worker = TrlWorker(args.trl_python, args, args.warmup + args.iterations)
  jax_iteration, jax_params = build_jax(args)
  times = {"rlhf_jax": {k: [] for k in PHASE_KEYS}, "trl": {k: [] for k in PHASE_KEYS}}
  try:
    for it in range(args.warmup + args.iterations):
      jax_times = jax_iteration(it)
      trl_times = worker.step()
      log_iteration("trl", it, trl_times)
      if it >= args.warmup:
        record(times["rlhf_jax"], jax_times)
        record(times["trl"], trl_times)
  finally:
    worker.close()
  return [dict(summarize("rlhf_jax", times["rlhf_jax"], args, jax_params),
               devices=jax_devices()),
          dict(summarize("trl", times["trl"], args, trl_param_count(args)),
               versions=worker.wait_ready())]


def main(argv=None):
  args = parse_args(argv)
  # rlhf_jax/host_memory.py needs only the standard library: importable from the
  # repository even in a TRL venv without rlhf_jax.
  sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from rlhf_jax import host_memory
  if args.impl in ("jax", "both"):
    # As the trainer does, before jax starts its threads (rlhf_jax/host_memory.py).
    host_memory.configure_for_this_host()
  elif args.trl_keep_freed_memory:
    host_memory.keep_freed_memory()  # before torch starts its threads
  if args.impl == "trl_worker":
    trl_worker(args)
    return
  if args.impl == "trl":
    print(json.dumps(run_trl(args)))
    return
  if args.impl == "both" and not args.trl_python:
    print("(trl is not installed here and no --trl_python: TRL side skipped)",
          file=sys.stderr)
  if args.impl == "both" and args.trl_python:
    rows = run_both(args)
  else:
    rows = [run_jax(args)]
  for r in rows:
    print(json.dumps(r))
  print_table(rows)


if __name__ == "__main__":
  main()
