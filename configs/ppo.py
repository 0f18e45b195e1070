"""PPO from a reward model, with a per-token KL penalty to the SFT policy.

The stage reads two finished runs, given in the config: the SFT run
(`ppo.sft_checkpoint`: the policy's and the reference's params, the model
architecture and the tokenizer) and the RM run (`ppo.rm_checkpoint`: the frozen
reward model, and the critic's initial params). The prompts are a 'prompts' file
({"prompt", optional "reference"}); held-out prompts (`data.eval_files`) give the
evaluation in summary.json: mean RM score, KL from the SFT policy, win rates against
the SFT policy's samples and the references.

Presets:
  (none)        Ziegler et al. 2019 / Stiennon et al. 2020: adaptive KL (beta0 0.15,
                target 6 nats, horizon 10,000), temperature 0.7, batch 64, 4 epochs,
                clip 0.2, vf 0.1, gamma 1, lambda 0.95, Adam eps 1e-5.
  instructgpt   Ouyang et al. 2022: fixed beta 0.02, temperature 1, batch 512 in
                minibatches of 64, 1 epoch, PPO-ptx with gamma 27.8 (give
                ppo.ptx_files), EMA 0.992, Adam betas (0.9, 0.95).
  runlocal      a laptop-CPU run against the bundled synthetic task's SFT and RM.

CPU (`:runlocal`): first the SFT and RM stages of the demo pipeline (~8 minutes on
a busy 2-core machine), then 60 PPO iterations from them (~4 minutes; ~3 s per
iteration of 32 episodes):

  python -m rlhf_jax.train --config configs/demo.py --workdir /tmp/demo \\
      --config.pipeline.stages=sft,rm
  python -m rlhf_jax.train --config configs/ppo.py:runlocal --workdir /tmp/ppo \\
      --config.ppo.sft_checkpoint=/tmp/demo/sft --config.ppo.rm_checkpoint=/tmp/demo/rm \\
      --config.data.train_files=/tmp/demo/task/prompts_train.jsonl \\
      --config.data.eval_files=/tmp/demo/task/prompts_eval.jsonl

  Expected (measured once): ppo/score rising from -0.16 to ~0.27 while ppo/kl
  settles near its 2-nat target (~2.8 over the last 10 iterations, beta 0.05 ->
  0.066); in summary.json ppo.score 0.29 vs ppo.sft_score 0.02 (RM), and under
  the task's hidden gold labeler (ppo.eval_judge) ppo.judge_score -0.42 vs
  ppo.sft_judge_score -0.65 and ppo.win_rate_vs_sft 0.67. (The demo's small RM is
  weak, so most of the gain is in the RM's score, not the gold one.)

TPU VM (the default preset; e.g. a TL;DR SFT and RM of the same size):

  python -m rlhf_jax.train --config configs/ppo.py --workdir gs://BUCKET/ppo \\
      --config.ppo.sft_checkpoint=gs://BUCKET/sft --config.ppo.rm_checkpoint=gs://BUCKET/rm \\
      --config.data.train_files='tldr/prompts_train.jsonl' \\
      --config.data.eval_files='tldr/prompts_valid.jsonl'

  Expected (not measured here): the KL settles near 6 nats, the RM score rises
  by about 1-2 (RM normalised to mean 0 on references), and win rate against the
  references climbs above 0.5 under the RM.
"""
from rlhf_jax import config_base


def get_config(arg: str | None = None):
  c = config_base.base_config()
  c.stage = "ppo"

  # The model's architecture comes from the SFT run; only dtype and remat apply.
  c.model.dtype = "bfloat16"
  c.data.format = "prompts"
  c.data.prompt_len = 512  # Stiennon et al.: queries <= 512 tokens
  c.data.response_len = 48  # references, for evaluation
  c.data.num_epochs = 0  # prompts repeat for as many iterations as needed
  # Cut over-long prompts (keeping their end) and references (used only for the
  # win rate at evaluation; their EOS is kept) instead of rejecting the record.
  c.data.truncate = True
  c.data.eval_batch_size = 64
  c.model.max_len = 576

  c.rollout.new_tokens = 48  # Stiennon et al.: responses <= 48 tokens
  c.rollout.temperature = 0.7

  c.ppo.iterations = 1000
  c.ppo.batch_size = 64  # episodes per iteration (Ziegler et al.)
  c.ppo.epochs = 4
  c.ppo.minibatches = 1
  c.ppo.kl_coef = 0.15
  c.ppo.adaptive_kl = True
  c.ppo.kl_target = 6.0
  c.ppo.kl_horizon = 10000
  c.ppo.eval_every_iterations = 50
  c.ppo.eval_batches = 4

  c.optim.learning_rate = 1.5e-5  # Stiennon et al., 1.3B
  c.optim.schedule = "linear"
  c.optim.warmup_steps = 0
  c.optim.end_lr_fraction = 0.0
  c.optim.eps = 1e-5
  c.optim.grad_clip_norm = 1.0

  c.checkpoint.every_steps = 50  # iterations
  c.log.every_steps = 1  # one line per iteration

  if arg == "instructgpt":
    c.rollout.temperature = 1.0
    c.ppo.batch_size = 512
    c.ppo.minibatches = 8  # minibatches of 64
    c.ppo.epochs = 1
    c.ppo.adaptive_kl = False
    c.ppo.kl_coef = 0.02
    c.ppo.gamma_ptx = 27.8
    # InstructGPT: 8x as many pretraining examples as episodes.
    c.ppo.ptx_batch_size = 8 * 64
    c.ppo.ema_decay = 0.992
    c.optim.b2 = 0.95
    c.optim.learning_rate = 9.65e-6
  elif arg == "runlocal":
    # Sized for the demo's SFT/RM runs (configs/demo.py): 2-layer d_model 64.
    c.model.dtype = "float32"  # bf16 matmuls are slow on CPU
    c.data.prompt_len = 96
    c.data.response_len = 32
    c.data.eval_batch_size = 32
    c.model.max_len = 128
    c.rollout.new_tokens = 24
    c.ppo.iterations = 60
    c.ppo.batch_size = 32
    c.ppo.minibatches = 2
    c.ppo.kl_coef = 0.05
    c.ppo.kl_target = 2.0
    # 60 iterations are 1,920 episodes: a 10,000-episode horizon would barely move beta.
    c.ppo.kl_horizon = 1000
    c.ppo.eval_every_iterations = 20
    c.ppo.eval_batches = 2
    c.ppo.eval_judge = "rlhf_jax.data.synthetic:gold_score"
    c.optim.learning_rate = 3e-4
    c.optim.schedule = "cosine"
    c.checkpoint.every_steps = 20
  elif arg:
    raise ValueError(f"unknown preset {arg!r} (expected 'runlocal', 'instructgpt' or nothing)")
  c.lock()
  return c
