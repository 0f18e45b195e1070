"""TL;DR summarisation from human feedback with GPT-2 (124M): SFT, RM and PPO.

The recipe of "Learning to summarize from human feedback" (Stiennon et al. 2020)
as reproduced openly by Huang et al. 2024 ("The N+ implementation details of
RLHF with PPO"), at GPT-2 size on one TPU v4-8 or v5p-8 host (4 chips). Presets:

  :sft  fine-tune GPT-2 on the preferred summary of each TL;DR comparison
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
"reference": human summary}). GPT-2 from Hugging Face, nothing else:

  huggingface-cli download openai-community/gpt2 --local-dir checkpoints/gpt2

TPU VM, v4-8 (launch/README.md; v5p-8 the same with --accelerator v5p-8):

  launch/tpu.sh run --config configs/tldr_gpt2.py:sft --workdir gs://BUCKET/gpt2/sft \\
      --config.model.init_from=checkpoints/gpt2 \\
      --config.tokenizer.path=checkpoints/gpt2/tokenizer.json \\
      --config.data.train_files='gs://BUCKET/tldr/comparisons/train-*.jsonl' \\
      --config.data.eval_files='gs://BUCKET/tldr/comparisons/valid-*.jsonl'
  launch/tpu.sh run --config configs/tldr_gpt2.py:rm --workdir gs://BUCKET/gpt2/rm \\
      --config.rm.init_checkpoint=gs://BUCKET/gpt2/sft \\
      --config.data.train_files=... --config.data.eval_files=...   # as for SFT
  launch/tpu.sh run --config configs/tldr_gpt2.py:ppo --workdir gs://BUCKET/gpt2/ppo \\
      --config.ppo.sft_checkpoint=gs://BUCKET/gpt2/sft \\
      --config.ppo.rm_checkpoint=gs://BUCKET/gpt2/rm \\
      --config.data.train_files='gs://BUCKET/tldr/queries/train.jsonl' \\
      --config.data.eval_files='gs://BUCKET/tldr/queries/valid.jsonl'

(Locally, the same `python -m rlhf_jax.train --config ... --workdir ...`.) There is
no CPU preset: 565-token sequences through a 124M model are a TPU job. On CPU, use
configs/demo.py for the whole pipeline in minutes, and plan this one (below).

Expected (not measured here; no TPU was available while writing this): RM
validation accuracy below the 0.63 that Huang et al. report for Pythia-1B.

Plans for a v4-8 (CPU compile only, nothing allocated). Every stage fits a v4's
32 GiB, so the same presets run on a v5p-8 (95 GiB chips):

  python -m rlhf_jax.plan --config configs/tldr_gpt2.py:sft --num_devices 4 --chip v4

  stage sft on 4 devices, mesh data=4 fsdp=1 tensor=1
  model gpt2, 0.124B params (trunk + LM head): 12 layers, d_model 768,
    compute bfloat16, params float32, remat none, scan_layers True
  note: model.init_from checkpoints/gpt2 is not here: planned with config.model's
    fields (they must match the checkpoint)
  per-device memory in GiB (chip v4: 32 GiB HBM)
    function              args     out   alias    temp    code   other    peak  fits
    sft/train_step        1.39    1.39    1.39   12.12    0.00    0.00   13.51  yes
  FLOPs per call, all devices (XLA: its per-device count x devices, loop
  bodies counted once; analytic: 6 x params x tokens trained, 2 x forward)
    sft/train_step     XLA 5.108e+12  analytic 5.394e+13  compiled in 54 s
  peak 13.51 GiB per device: fits in v4 HBM (32 GiB)

  python -m rlhf_jax.plan --config configs/tldr_gpt2.py:rm --num_devices 4 --chip v4

  stage rm on 4 devices, mesh data=4 fsdp=1 tensor=1
  model gpt2, 0.124B params (trunk + LM head): 12 layers, d_model 768,
    compute bfloat16, params float32, remat none, scan_layers True
  per-device memory in GiB (chip v4: 32 GiB HBM)
    function              args     out   alias    temp    code   other    peak  fits
    rm/train_step         1.39    1.39    1.39   12.15    0.00    0.00   13.54  yes
  FLOPs per call, all devices (XLA: its per-device count x devices, loop
  bodies counted once; analytic: 6 x params x tokens trained, 2 x forward)
    rm/train_step      XLA 9.950e+11  analytic 2.950e+13  compiled in 104 s
  peak 13.54 GiB per device: fits in v4 HBM (32 GiB)

  python -m rlhf_jax.plan --config configs/tldr_gpt2.py:ppo --num_devices 4 --chip v4

  stage ppo on 4 devices, mesh data=4 fsdp=1 tensor=1
  model gpt2, 0.124B params (trunk + LM head): 12 layers, d_model 768,
    compute bfloat16, params float32, remat none, scan_layers True
  per-device memory in GiB (chip v4: 32 GiB HBM)
    function              args     out   alias    temp    code   other    peak  fits
    rollout/generate      0.46    0.00    0.00   10.32    0.00    3.25   14.03  yes
    rollout/score         1.85    0.00    0.00    6.45    0.00    1.85   10.16  yes
    ppo/update            2.78    2.78    2.78   20.43    0.00    0.93   24.14  yes
  FLOPs per call, all devices (XLA: its per-device count x devices, loop
  bodies counted once; analytic: 6 x params x tokens trained, 2 x forward)
    rollout/generate   XLA 4.342e+12  analytic 7.193e+13  compiled in 14 s
    rollout/score      XLA 2.285e+13  analytic 2.877e+14  compiled in 12 s
    ppo/update         XLA 2.205e+12  analytic 1.726e+15  compiled in 58 s
  peak 24.14 GiB per device: fits in v4 HBM (32 GiB)
"""
from rlhf_jax import config_base
from rlhf_jax.errors import ConfigError

PRESETS = ("sft", "rm", "ppo")


def get_config(arg: str | None = None):
  if arg not in PRESETS:
    raise ConfigError(f"configs/tldr_gpt2.py: preset {arg!r} is not one of {PRESETS} "
                      "(e.g. --config configs/tldr_gpt2.py:sft)")
  c = config_base.base_config()
  c.stage = arg

  # GPT-2 124M (openai-community/gpt2's config.json). With model.init_from the
  # checkpoint's own config wins; these fields let the plan run without it.
  c.model.family = "gpt2"
  c.model.vocab_size = 50257
  c.model.d_model = 768
  c.model.n_layers = 12
  c.model.n_heads = 12
  c.model.n_kv_heads = 12
  c.model.d_ff = 3072
  c.model.max_len = 1024  # GPT-2's position table; queries + summaries use 565
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  # One scanned layer compiles instead of 12 unrolled ones (minutes less per stage).
  c.model.scan_layers = True
  # Only SFT starts from GPT-2; the RM and PPO start from the previous stages.
  c.model.init_from = "checkpoints/gpt2" if arg == "sft" else ""
  c.tokenizer.path = "checkpoints/gpt2/tokenizer.json" if arg == "sft" else ""

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

  # 4 chips (v4-8 / v5p-8): plain data parallelism; a 124M model's params and Adam
  # moments (2 GB) fit on every chip.
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.checkpoint.every_steps = 500
  c.log.every_steps = 10

  if arg == "sft":
    c.data.batch_size = 128
    c.data.eval_batch_size = 128
    # 4 micro-batches of 32 (8 per chip): the [8, 565, 50257] float32 logits and
    # their gradient, not the weights, are what fill a chip (see the plan).
    c.optim.accum_steps = 4
    c.sft.steps = -1  # one epoch over the comparisons' preferred summaries
    c.sft.eval_every_steps = 200
    c.sft.eval_batches = 16
  elif arg == "rm":
    c.data.batch_size = 64  # comparisons per step (Stiennon et al.)
    c.data.eval_batch_size = 64
    c.optim.accum_steps = 2  # 2 x 32 comparisons = 64 sequences, 16 per chip
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
