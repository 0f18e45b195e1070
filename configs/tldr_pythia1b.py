"""TL;DR summarisation from human feedback with Pythia-1B: SFT, RM and PPO.

The recipe of "Learning to summarize from human feedback" (Stiennon et al. 2020)
as reproduced openly by Huang et al. 2024 ("The N+ implementation details of
RLHF with PPO") with Pythia-1B (EleutherAI, GPT-NeoX family), on one TPU v4-8 or
v5p-8 host (4 chips). Presets:

  :sft  fine-tune Pythia-1B on the preferred summary of each TL;DR comparison
  :rm   reward model on the comparisons, trunk from the SFT run (1 epoch)
  :ppo  PPO against the RM, critic initialised from the RM, KL to the SFT policy

Figures taken from the papers (DESIGN.md section 12): one learning rate, 3e-6, for
every stage, no dropout, 53 response tokens, the reward read at the EOS token,
critic from the RM (Huang et al.); RM batch 64 comparisons, 1 epoch; PPO batch 512
rollouts, 4 epochs, gamma 1, lambda 0.95, fixed KL coefficient 0.05, queries up to
512 tokens with the post cut at a newline to fit (Stiennon et al.; their
summaries are at most 48 tokens). Our choices, not published: SFT batch 128,
PPO in 4 minibatches, linear decay of the learning rate to 0, 1M episodes.

Data: the comparisons of openai/summarize_from_feedback as JSONL (`tldr` format,
one {info, summaries, choice} record per line); PPO reads the TL;DR queries as
a `prompts` file ({"prompt": "SUBREDDIT: r/...\\n\\nTITLE: ...\\n\\nPOST: ...\\n\\nTL;DR:",
"reference": human summary}). Pythia-1B (deduped, as Huang et al. used), from
Hugging Face:

  huggingface-cli download EleutherAI/pythia-1b-deduped --local-dir checkpoints/pythia-1b

TPU VM, v4-8 (launch/README.md; v5p-8 the same with --accelerator v5p-8):

  launch/tpu.sh run --config configs/tldr_pythia1b.py:sft --workdir gs://BUCKET/pythia/sft \\
      --config.model.init_from=checkpoints/pythia-1b \\
      --config.tokenizer.path=checkpoints/pythia-1b/tokenizer.json \\
      --config.data.train_files='gs://BUCKET/tldr/comparisons/train-*.jsonl' \\
      --config.data.eval_files='gs://BUCKET/tldr/comparisons/valid-*.jsonl'
  launch/tpu.sh run --config configs/tldr_pythia1b.py:rm --workdir gs://BUCKET/pythia/rm \\
      --config.rm.init_checkpoint=gs://BUCKET/pythia/sft \\
      --config.data.train_files=... --config.data.eval_files=...   # as for SFT
  launch/tpu.sh run --config configs/tldr_pythia1b.py:ppo --workdir gs://BUCKET/pythia/ppo \\
      --config.ppo.sft_checkpoint=gs://BUCKET/pythia/sft \\
      --config.ppo.rm_checkpoint=gs://BUCKET/pythia/rm \\
      --config.data.train_files='gs://BUCKET/tldr/queries/train.jsonl' \\
      --config.data.eval_files='gs://BUCKET/tldr/queries/valid.jsonl' \\
      --config.ppo.batch_size=256   # v4-8 only: 512 needs a v5p-8 (see the plans)

(Locally, the same `python -m rlhf_jax.train --config ... --workdir ...`.) There is
no CPU preset: 565-token sequences through a 1B model are a TPU job. On CPU, use
configs/demo.py for the whole pipeline in minutes, and plan this one (below).

Expected (not measured here; no TPU was available while writing this): RM
validation accuracy about 0.63, as Huang et al. report for Pythia-1B.

Plans (CPU compile only, nothing allocated). SFT and RM fit a v4-8. PPO with
Stiennon et al.'s 512 rollouts does not: sampling 128 rollouts per chip (KV cache
and prefill) takes 38.6 GiB, so a v4-8 needs --config.ppo.batch_size=256 (below);
a v5p-8 runs 512.

  python -m rlhf_jax.plan --config configs/tldr_pythia1b.py:sft --num_devices 4 --chip v4

  stage sft on 4 devices, mesh data=1 fsdp=4 tensor=1
  model neox, 1.011B params (trunk + LM head): 16 layers, d_model 2048,
    compute bfloat16, params float32, remat full, scan_layers True
  note: model.init_from checkpoints/pythia-1b is not here: planned with config.model's
    fields (they must match the checkpoint)
  per-device memory in GiB (chip v4: 32 GiB HBM)
    function              args     out   alias    temp    code   other    peak  fits
    sft/train_step        2.83    2.83    2.83    6.13    0.00    0.00    8.96  yes
  FLOPs per call, all devices (XLA: its per-device count x devices, loop
  bodies counted once; analytic: 6 x params x tokens trained, 2 x forward)
    sft/train_step     XLA 1.812e+13  analytic 4.388e+14  compiled in 61 s
  peak 8.96 GiB per device: fits in v4 HBM (32 GiB)

  python -m rlhf_jax.plan --config configs/tldr_pythia1b.py:rm --num_devices 4 --chip v4

  stage rm on 4 devices, mesh data=1 fsdp=4 tensor=1
  model neox, 1.011B params (trunk + LM head): 16 layers, d_model 2048,
    compute bfloat16, params float32, remat full, scan_layers True
  per-device memory in GiB (chip v4: 32 GiB HBM)
    function              args     out   alias    temp    code   other    peak  fits
    rm/train_step         2.54    2.54    2.54    5.04    0.00    0.00    7.58  yes
  FLOPs per call, all devices (XLA: its per-device count x devices, loop
  bodies counted once; analytic: 6 x params x tokens trained, 2 x forward)
    rm/train_step      XLA 3.803e+12  analytic 2.400e+14  compiled in 97 s
  peak 7.58 GiB per device: fits in v4 HBM (32 GiB)

  python -m rlhf_jax.plan --config configs/tldr_pythia1b.py:ppo --num_devices 4 --chip v5p

  stage ppo on 4 devices, mesh data=1 fsdp=4 tensor=1
  model neox, 1.011B params (trunk + LM head): 16 layers, d_model 2048,
    compute bfloat16, params float32, remat full, scan_layers True
  per-device memory in GiB (chip v5p: 95 GiB HBM)
    function              args     out   alias    temp    code   other    peak  fits
    rollout/generate      0.94    0.00    0.00   31.47    0.00    6.22   38.64  yes
    rollout/score         3.58    0.00    0.00    8.43    0.00    3.58   15.60  yes
    ppo/update            5.37    5.37    5.37    7.16    0.00    1.79   14.32  yes
  FLOPs per call, all devices (XLA: its per-device count x devices, loop
  bodies counted once; analytic: 6 x params x tokens trained, 2 x forward)
    rollout/generate   XLA 2.819e+13  analytic 5.851e+14  compiled in 19 s
    rollout/score      XLA 1.340e+14  analytic 2.221e+15  compiled in 14 s
    ppo/update         XLA 1.490e+13  analytic 1.333e+16  compiled in 60 s
  peak 38.64 GiB per device: fits in v5p HBM (95 GiB)

  python -m rlhf_jax.plan --config configs/tldr_pythia1b.py:ppo --num_devices 4 --chip v4 \\
      --config.ppo.batch_size=256

  stage ppo on 4 devices, mesh data=1 fsdp=4 tensor=1
  model neox, 1.011B params (trunk + LM head): 16 layers, d_model 2048,
    compute bfloat16, params float32, remat full, scan_layers True
  per-device memory in GiB (chip v4: 32 GiB HBM)
    function              args     out   alias    temp    code   other    peak  fits
    rollout/generate      0.94    0.00    0.00   15.98    0.00    6.22   23.14  yes
    rollout/score         3.58    0.00    0.00    4.74    0.00    3.58   11.91  yes
    ppo/update            5.37    5.37    5.37    5.69    0.00    1.79   12.86  yes
  FLOPs per call, all devices (XLA: its per-device count x devices, loop
  bodies counted once; analytic: 6 x params x tokens trained, 2 x forward)
    rollout/generate   XLA 1.410e+13  analytic 2.926e+14  compiled in 11 s
    rollout/score      XLA 6.702e+13  analytic 1.111e+15  compiled in 9 s
    ppo/update         XLA 7.473e+12  analytic 6.664e+15  compiled in 25 s
  peak 23.14 GiB per device: fits in v4 HBM (32 GiB)
"""
from rlhf_jax import config_base
from rlhf_jax.errors import ConfigError

PRESETS = ("sft", "rm", "ppo")


def get_config(arg: str | None = None):
  if arg not in PRESETS:
    raise ConfigError(f"configs/tldr_pythia1b.py: preset {arg!r} is not one of {PRESETS} "
                      "(e.g. --config configs/tldr_pythia1b.py:sft)")
  c = config_base.base_config()
  c.stage = arg

  # Pythia-1B (EleutherAI/pythia-1b's config.json: GPT-NeoX, parallel residual,
  # rotary on 25% of each head, untied LM head, embedding padded to 50304 rows).
  # With model.init_from the checkpoint's own config wins; these fields let the
  # plan run without it.
  c.model.family = "neox"
  c.model.vocab_size = 50304
  c.model.d_model = 2048
  c.model.n_layers = 16
  c.model.n_heads = 8
  c.model.n_kv_heads = 8
  c.model.d_ff = 8192
  c.model.max_len = 2048
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  # One scanned layer compiles instead of 16 unrolled ones (minutes less per stage),
  # and full remat keeps only each layer's input for the backward pass: without
  # it the activations of 8 sequences per chip take ~17 GiB more (planned: SFT
  # temporaries 23.0 GiB without remat, 6.1 with).
  c.model.scan_layers = True
  c.model.remat = "full"
  # Only SFT starts from Pythia-1B; the RM and PPO start from the previous stages.
  c.model.init_from = "checkpoints/pythia-1b" if arg == "sft" else ""
  c.tokenizer.path = "checkpoints/pythia-1b/tokenizer.json" if arg == "sft" else ""

  c.data.format = "prompts" if arg == "ppo" else "tldr"
  c.data.prompt_len = 512  # Stiennon et al.: queries up to 512 tokens
  c.data.response_len = 53  # Huang et al.: 53 response tokens, EOS included
  # Cut the odd over-long summary (keeping its start and the EOS) instead of failing.
  c.data.truncate = True
  c.data.num_epochs = 1

  # Huang et al.: 3e-6 for every stage.
  c.optim.learning_rate = 3e-6
  c.optim.schedule = "linear"
  c.optim.end_lr_fraction = 0.0
  c.optim.warmup_steps = 0
  c.optim.weight_decay = 0.0

  # 4 chips (v4-8 / v5p-8): params and Adam moments sharded over all of them
  # (ZeRO-3 style): 16 GB per 1B network would not leave room on a v4's 32 GiB.
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.tensor = 1
  c.checkpoint.every_steps = 500
  c.log.every_steps = 10

  if arg == "sft":
    c.data.batch_size = 128
    c.data.eval_batch_size = 128
    # 4 micro-batches of 32 (8 per chip): the [8, 565, 50304] float32 logits and
    # their gradient, not the weights, are what fill a chip (see the plan).
    c.optim.accum_steps = 4
    c.sft.steps = -1  # one epoch over the comparisons' preferred summaries
    c.sft.eval_every_steps = 200
    c.sft.eval_batches = 16
  elif arg == "rm":
    c.data.batch_size = 64  # comparisons per step (Stiennon et al.)
    c.data.eval_batch_size = 64
    c.optim.accum_steps = 4  # 4 x 16 comparisons = 32 sequences, 8 per chip
    c.rm.steps = -1  # 1 epoch
    c.rm.eval_every_steps = 200
    c.rm.normalize = True  # reference (preferred) summaries score mean 0
  else:
    c.data.eval_batch_size = 64
    c.data.num_epochs = 0  # queries repeat for as many iterations as asked
    c.rollout.new_tokens = 53
    c.rollout.temperature = 0.7
    c.ppo.batch_size = 512  # Stiennon et al. (1.3B)
    c.ppo.minibatches = 4  # 128 rollouts per optimizer step
    c.optim.accum_steps = 4  # of 32 (8 per chip), as in SFT
    c.ppo.epochs = 4
    c.ppo.iterations = 1_000_000 // 512  # 1M episodes
    c.ppo.gamma = 1.0
    c.ppo.lam = 0.95
    c.ppo.kl_coef = 0.05  # fixed beta (Stiennon et al.)
    c.ppo.adaptive_kl = False
    c.ppo.value_head = "keep"  # critic = the RM, head included (Huang et al.)
    c.ppo.missing_eos_penalty = -1.0
    c.ppo.eval_every_iterations = 50
    c.checkpoint.every_steps = 50  # iterations
    c.log.every_steps = 1
  c.lock()
  return c
