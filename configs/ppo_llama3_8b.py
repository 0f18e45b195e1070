"""PPO for Llama-3-8B on a TPU v5p pod slice (InstructGPT's recipe, Ouyang et al. 2022).

Policy, frozen reference (the SFT model), critic and reward model are four 8B
networks on one ('data', 'fsdp', 'tensor') mesh, every parameter and Adam moment
sharded over 'fsdp' (ZeRO-3 style) and 4-way 'tensor' (Megatron style);
activations are split over the batch. The
critic starts from the RM (Stiennon et al. 2020; InstructGPT). The model is
Llama-3-8B's architecture (d_model 4096, 32 layers, 32 heads, 8 key/value heads,
d_ff 14336, vocabulary 128256, RoPE theta 500,000), computed in bfloat16 with
float32 params, layers under `nn.scan` (one layer compiled, not 32) and fully
rematerialised in the backward pass.

Recipe (InstructGPT, DESIGN.md section 12): 512 rollouts per iteration in
minibatches of 64, 1 PPO epoch, clip 0.2, fixed KL coefficient 0.02, sampling
temperature 1, Adam b2 0.95, EMA of the policy 0.992. PPO-ptx (gamma 27.8 on 8x
as many pretraining examples) is off here because it needs pretraining text:
add `--config.ppo.gamma_ptx=27.8 --config.ppo.ptx_files=gs://BUCKET/text/*.jsonl.gz
--config.ppo.ptx_batch_size=512`. The learning rate (1e-6, both networks) and the
lengths (prompts up to 512 tokens, 256 new tokens) are our choices for an 8B
chat model, not published figures.

The previous stages are SFT and RM runs of the same architecture, e.g. started from
Meta's checkpoint with `model.init_from`; their workdirs are given with
--config.ppo.sft_checkpoint / --config.ppo.rm_checkpoint. Prompts are a 'prompts'
JSONL file ({"prompt": ..., "reference": ...}).

TPU VM, v5p-64 (32 chips on 8 hosts; launch/README.md, Example 2):

  launch/tpu.sh create --accelerator v5p-64 --reserved
  launch/tpu.sh setup
  launch/tpu.sh run --config configs/ppo_llama3_8b.py --workdir gs://BUCKET/llama3_ppo \\
      --config.ppo.sft_checkpoint=gs://BUCKET/llama3_sft \\
      --config.ppo.rm_checkpoint=gs://BUCKET/llama3_rm \\
      --config.tokenizer.path=gs://BUCKET/Meta-Llama-3-8B/tokenizer.json \\
      --config.data.train_files='gs://BUCKET/prompts/train-*.jsonl.gz' \\
      --config.data.eval_files='gs://BUCKET/prompts/eval.jsonl.gz'

Expected (not measured: no pod was available while writing this): 500 iterations
= 256k episodes, InstructGPT's count; the score rises while the KL to the SFT
policy grows to a few nats per response.

Plan first, on any machine (CPU compile only; nothing is allocated). A v5p-N
slice has N TensorCores but N/2 chips, and JAX sees one device per chip (the two
cores of a chip act as one, "megacore"), so a v5p-64 is 32 devices:

  python -m rlhf_jax.plan --config configs/ppo_llama3_8b.py --num_devices 32 --chip v5p

  stage ppo on 32 devices, mesh data=1 fsdp=8 tensor=4
  model llama, 8.030B params (trunk + LM head): 32 layers, d_model 4096,
    compute bfloat16, params float32, remat full, scan_layers True
  per-device memory in GiB (chip v5p: 95 GiB HBM)
    function              args     out   alias    temp    code   other    peak  fits
    rollout/generate      0.94    0.00    0.00    5.83    0.00    7.24   14.01  yes
    rollout/score         3.62    0.00    0.00    6.85    0.00    4.56   15.03  yes
    ppo/update            6.37    6.37    6.37    9.77    0.00    1.81   17.95  yes
  FLOPs per call, all devices (XLA: its per-device count x devices, loop
  bodies counted once; analytic: 6 x params x tokens trained, 2 x forward)
    rollout/generate   XLA 1.195e+14  analytic 6.315e+15  compiled in 31 s
    rollout/score      XLA 9.841e+14  analytic 2.443e+16  compiled in 27 s
    ppo/update         XLA 2.176e+14  analytic 3.665e+16  compiled in 78 s
  peak 17.95 GiB per device: fits in v5p HBM (95 GiB)

On 64 devices (a v5p-128, or a v4-128 with 32 GiB chips):

  python -m rlhf_jax.plan --config configs/ppo_llama3_8b.py --num_devices 64 --chip v5p

  stage ppo on 64 devices, mesh data=1 fsdp=16 tensor=4
  model llama, 8.030B params (trunk + LM head): 32 layers, d_model 4096,
    compute bfloat16, params float32, remat full, scan_layers True
  per-device memory in GiB (chip v5p: 95 GiB HBM)
    function              args     out   alias    temp    code   other    peak  fits
    rollout/generate      0.47    0.00    0.00    3.48    0.00    3.62    7.58  yes
    rollout/score         1.81    0.00    0.00    3.85    0.00    2.28    7.94  yes
    ppo/update            3.19    3.19    3.19    5.17    0.00    0.91    9.26  yes
  FLOPs per call, all devices (XLA: its per-device count x devices, loop
  bodies counted once; analytic: 6 x params x tokens trained, 2 x forward)
    rollout/generate   XLA 1.196e+14  analytic 6.315e+15  compiled in 34 s
    rollout/score      XLA 9.843e+14  analytic 2.443e+16  compiled in 29 s
    ppo/update         XLA 2.178e+14  analytic 3.665e+16  compiled in 82 s
  peak 9.26 GiB per device: fits in v5p HBM (95 GiB)
"""
from rlhf_jax import config_base
from rlhf_jax.errors import ConfigError


def get_config(arg: str | None = None):
  c = config_base.base_config()
  c.stage = "ppo"

  # Llama-3-8B (Meta's config.json).
  c.model.family = "llama"
  c.model.vocab_size = 128256
  c.model.d_model = 4096
  c.model.n_layers = 32
  c.model.n_heads = 32
  c.model.n_kv_heads = 8
  c.model.d_ff = 14336
  c.model.rope_theta = 500000.0
  c.model.norm_eps = 1e-5
  c.model.max_len = 8192  # RoPE: no position table; only checked against the lengths
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  # One scanned layer compiles in seconds instead of 32 unrolled ones; full remat
  # keeps only each layer's input for the backward pass.
  c.model.scan_layers = True
  c.model.remat = "full"

  c.data.format = "prompts"
  c.data.prompt_len = 512  # tokens; longer prompts keep their end (data.truncate)
  c.data.truncate = True
  c.data.response_len = 256  # = rollout.new_tokens
  c.data.eval_batch_size = 64
  c.data.num_epochs = 0  # prompts repeat for as many iterations as asked
  c.rollout.new_tokens = 256
  c.rollout.temperature = 1.0  # InstructGPT

  c.ppo.batch_size = 512  # rollouts per iteration (InstructGPT)
  c.ppo.minibatches = 8  # 64 rollouts per optimizer step (InstructGPT)
  c.ppo.epochs = 1  # InstructGPT; Ziegler et al. / Stiennon et al. used 4
  c.ppo.iterations = 500  # x 512 = 256k episodes (InstructGPT)
  c.ppo.clip = 0.2
  c.ppo.kl_coef = 0.02  # fixed beta (InstructGPT)
  c.ppo.adaptive_kl = False
  c.ppo.gamma = 1.0
  c.ppo.lam = 0.95
  c.ppo.ema_decay = 0.992  # evaluate the EMA of the policy (InstructGPT)
  c.ppo.eval_every_iterations = 25
  c.ppo.eval_batches = 4

  c.optim.learning_rate = 1e-6
  c.optim.schedule = "constant"
  c.optim.warmup_steps = 10
  c.optim.b2 = 0.95  # InstructGPT's Adam betas (0.9, 0.95)
  c.optim.grad_clip_norm = 1.0

  # Params and Adam moments are sharded over 'fsdp' (ZeRO-3 style) and, Megatron
  # style, over 4-way 'tensor' (heads, mlp, vocab; 8 kv heads split 2 per device).
  # Pure fsdp over all devices would all-gather every layer's weights across the
  # whole slice for a micro-batch of one sequence per device; 4-way tensor cuts
  # that traffic by 4, gives each device 4x the batch, and splits the [B, T, 128256]
  # logits (the plan: peak 9.3 GiB on 64 devices with tensor=4, 12.9 without).
  c.mesh.data = 1
  c.mesh.fsdp = -1  # 8 on a v5p-64 (32 chips), 16 on 64 devices
  c.mesh.tensor = 4

  c.checkpoint.every_steps = 25  # iterations; an 8B PPO state is ~300 GB
  c.checkpoint.keep = 2
  c.log.every_steps = 1

  if arg:
    raise ConfigError(f"unknown preset {arg!r}; configs/ppo_llama3_8b.py takes none")
  c.lock()
  return c
