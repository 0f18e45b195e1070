"""Supervised fine-tuning on demonstrations (the first stage of InstructGPT).

Data: JSON lines {prompt, response} (data.format = 'demonstrations'), or any
comparison format ('hh', 'tldr', 'rankings'), in which case each record's best
response is the demonstration -- for HH-RLHF, the chosen reply. The loss is the
next-token cross-entropy on response tokens only (sft.include_prompt_loss=True to
also learn the prompts), averaged per token. The run ends with WORKDIR/params/,
which the RM (rm.init_checkpoint) and PPO (ppo.sft_checkpoint) stages load, and
summary.json with sft.val_loss.

CPU (`:runlocal`, a 2-layer d_model 64 model on the chosen replies of the HH pairs
in ../shared, 62 steps; about 70 s of CPU time, under 3 minutes wall even on a
busy 2-core machine):

  zcat ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz | head -n 2000 > /tmp/hh_train.jsonl
  zcat ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz | tail -n +2001 > /tmp/hh_eval.jsonl
  python -m rlhf_jax.train --config configs/sft.py:runlocal --workdir /tmp/sft_hh \\
      --config.data.train_files=/tmp/hh_train.jsonl --config.data.eval_files=/tmp/hh_eval.jsonl

  Expected: sft.val_loss falls from ln(1000) = 6.9 at initialisation to about 5.0
  nats per token after one epoch (measured 5.04); see summary.json.

  Then a reward model initialised from it (same tokenizer and architecture;
  measured rm.val_accuracy 0.558, within noise of the RM trained from scratch):

  python -m rlhf_jax.train --config configs/rm_hh.py:runlocal --workdir /tmp/rm_hh \\
      --config.data.train_files=/tmp/hh_train.jsonl --config.data.eval_files=/tmp/hh_eval.jsonl \\
      --config.rm.init_checkpoint=/tmp/sft_hh

TPU VM (default preset, a 12-layer d_model 768 GPT-2-shaped model on your own
demonstration files; 64 demonstrations per step, 4 epochs):

  python -m rlhf_jax.train --config configs/sft.py --workdir gs://BUCKET/sft \\
      --config.data.train_files='demos/train-*.jsonl.gz' \\
      --config.data.eval_files='demos/eval-*.jsonl.gz'

  Expected (not measured here): the eval loss of a model trained from scratch
  depends entirely on the data; start from a pretrained checkpoint
  (model.init_from) for a useful policy.
"""
from rlhf_jax import config_base
from rlhf_jax.errors import ConfigError


def get_config(arg: str | None = None):
  c = config_base.base_config()
  c.stage = "sft"

  c.data.format = "demonstrations"
  c.data.truncate = True
  c.data.prompt_len = 384
  c.data.response_len = 128
  c.data.batch_size = 64
  c.data.eval_batch_size = 64
  # InstructGPT trained SFT for 16 epochs; a few passes are plenty for small data.
  c.data.num_epochs = 4

  c.tokenizer.vocab_size = 16000
  c.model.family = "gpt2"
  c.model.d_model = 768
  c.model.n_layers = 12
  c.model.n_heads = 12
  c.model.n_kv_heads = 12
  c.model.d_ff = 3072
  c.model.max_len = 512
  c.model.dtype = "bfloat16"

  c.sft.steps = -1  # every batch of num_epochs passes
  c.sft.eval_every_steps = 500
  c.sft.eval_batches = 0  # the whole eval set
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.optim.weight_decay = 0.01
  c.checkpoint.every_steps = 500

  if arg == "runlocal":
    c.data.format = "hh"  # the chosen replies serve as demonstrations
    c.data.num_epochs = 1
    c.tokenizer.vocab_size = 1000
    c.tokenizer.model_type = "unigram"  # trains in seconds on a few MB of text
    c.model.d_model = 64
    c.model.n_layers = 2
    c.model.n_heads = 4
    c.model.n_kv_heads = 4
    c.model.d_ff = 256
    c.model.max_len = 160
    c.model.dtype = "float32"
    c.data.prompt_len = 112
    c.data.response_len = 48
    c.data.batch_size = 32
    c.data.eval_batch_size = 64
    c.optim.learning_rate = 3e-3
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.0
    c.sft.eval_every_steps = 1000  # only the final eval
    c.checkpoint.every_steps = 25
    c.log.every_steps = 5
  elif arg:
    raise ConfigError(f"unknown preset {arg!r}; expected 'runlocal' or nothing")

  c.lock()
  return c
