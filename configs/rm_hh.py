"""Reward model on Anthropic HH-RLHF preference pairs (Bai et al. 2022).

Each record is {chosen, rejected}: two dialogues that share every turn but the
last Assistant reply. The prompt is the shared dialogue, the two replies are the
responses (K = 2), and the RM learns -log sigmoid(r_chosen - r_rejected), the
reward read at each reply's EOS token. One epoch, as in InstructGPT and Stiennon
et al. 2020; afterwards the bias is set so that the chosen replies of the
training data score mean 0 (rm.normalize). With no tokenizer given, a
sentencepiece tokenizer is trained on the training text and saved as
WORKDIR/tokenizer.model. Long dialogues are cut to fit (data.truncate): prompts
keep their last turns, replies their beginning plus the EOS.

CPU (`:runlocal`, a 2-layer d_model 64 model, 62 steps; about 70 s of CPU time,
under 2 minutes wall even on a busy 2-core machine; a fifth of it is training
the tokenizer, preparing the data and compiling). The shared HH file is the
harmless-base *test* split; hold out its last 312 pairs:

  zcat ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz | head -n 2000 > /tmp/hh_train.jsonl
  zcat ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz | tail -n +2001 > /tmp/hh_eval.jsonl
  python -m rlhf_jax.train --config configs/rm_hh.py:runlocal --workdir /tmp/rm_hh \\
      --config.data.train_files=/tmp/hh_train.jsonl --config.data.eval_files=/tmp/hh_eval.jsonl

  Expected: summary.json rm.val_accuracy about 0.6 (measured 0.628 on the 312
  held-out pairs; harmless-base is hard, and a 0.2M-parameter model trained on
  2,000 pairs mostly learns length and wording cues; ~0.03 is the sampling noise
  of 312 pairs).

TPU VM (default preset, a 12-layer d_model 768 GPT-2-shaped model trained from
scratch on the full HH training set, e.g. all four *-base/-online/-rejection
train files concatenated, ~160k pairs; batch 64 pairs):

  python -m rlhf_jax.train --config configs/rm_hh.py --workdir gs://BUCKET/rm_hh \\
      --config.data.train_files='hh/*train.jsonl.gz' --config.data.eval_files='hh/*test.jsonl.gz'

  Expected (not measured here): about 1 hour on a v4-8; validation accuracy
  near 0.6 from random init. Reward models are normally initialised from a
  pretrained or SFT model (rm.init_checkpoint = an SFT run's workdir, or
  model.init_from = a HF checkpoint), which is what gets HH RMs to ~0.7.
"""
from rlhf_jax import config_base
from rlhf_jax.errors import ConfigError


def get_config(arg: str | None = None):
  c = config_base.base_config()
  c.stage = "rm"

  c.data.format = "hh"
  # HH dialogues run to thousands of tokens; cut them (counted in summary.json).
  c.data.truncate = True
  c.data.prompt_len = 384
  c.data.response_len = 128
  c.data.batch_size = 64  # pairs per step (InstructGPT: 64 prompts)
  c.data.eval_batch_size = 64
  c.data.num_epochs = 1

  c.tokenizer.vocab_size = 16000
  c.model.family = "gpt2"
  c.model.d_model = 768
  c.model.n_layers = 12
  c.model.n_heads = 12
  c.model.n_kv_heads = 12
  c.model.d_ff = 3072
  c.model.max_len = 512
  c.model.dtype = "bfloat16"

  c.rm.steps = -1  # one epoch
  c.rm.eval_every_steps = 500
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 100
  c.optim.schedule = "cosine"
  c.optim.weight_decay = 0.01
  c.checkpoint.every_steps = 500

  if arg == "runlocal":
    # A model small enough to train on a laptop CPU in about a minute.
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
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 10
    c.optim.weight_decay = 0.0
    c.rm.eval_every_steps = 1000  # only the final eval
    c.checkpoint.every_steps = 25
    c.log.every_steps = 5
  elif arg:
    raise ConfigError(f"unknown preset {arg!r}; expected 'runlocal' or nothing")

  c.lock()
  return c
