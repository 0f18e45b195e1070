"""Every config field rlhf_jax reads, with its default and meaning.

Experiment files in configs/ start from `base_config()`, change what they need and
end with `config.lock()`, so a mistyped override (`--config.optim.lrr=...`) is an
error instead of a silently ignored flag. Sub-dicts mirror the code: `model`,
`tokenizer`, `data`, `optim`, `sft`, `rm`, `ppo`, `rollout`, `mesh`, `checkpoint`,
`log`. Batch sizes are global (summed over all devices and hosts); durations are
counted in steps.
"""
from __future__ import annotations

import ml_collections

from rlhf_jax.errors import ConfigError

STAGES = ("sft", "rm", "ppo", "pipeline")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = "sft"  # sft | rm | ppo | pipeline
  c.seed = 0

  # Tied: the model's vocabulary is the tokenizer's.
  vocab_size = ml_collections.FieldReference(8000)

  c.model = ml_collections.ConfigDict()
  c.model.family = "gpt2"  # gpt2 | llama | neox
  c.model.vocab_size = vocab_size
  c.model.d_model = 256
  c.model.n_layers = 4
  c.model.n_heads = 4
  # Grouped-query attention (llama): key/value heads; must divide n_heads.
  c.model.n_kv_heads = 4
  c.model.d_ff = 1024
  # Longest sequence (prompt + response); sizes the learned position table.
  c.model.max_len = 512
  # Compute dtype. bfloat16 on TPU/GPU; float32 on CPU, where bf16 matmuls are slow.
  c.model.dtype = "float32"
  c.model.param_dtype = "float32"
  c.model.remat = "none"  # none | full | dots: recompute activations to save memory
  c.model.scan_layers = False  # nn.scan over layers: faster compiles for deep models
  # None: the family's default (rope_theta 10,000; norm_eps 1e-5).
  c.model.rope_theta = ml_collections.FieldReference(None, field_type=float)
  c.model.norm_eps = ml_collections.FieldReference(None, field_type=float)
  # A Hugging Face safetensors checkpoint directory to start from ('' = random init).
  c.model.init_from = ""

  c.tokenizer = ml_collections.ConfigDict()
  # A sentencepiece .model file. '' trains one on the training text and saves it
  # in the workdir (tokenizer.model), which later stages then reuse.
  c.tokenizer.path = ""
  c.tokenizer.vocab_size = vocab_size
  c.tokenizer.model_type = "bpe"  # bpe | unigram
  # At most this many training texts are used to train the tokenizer.
  c.tokenizer.train_max_texts = 20000

  c.data = ml_collections.ConfigDict()
  c.data.format = "demonstrations"  # demonstrations | hh | tldr | rankings | prompts | text
  c.data.train_files = ""  # comma-separated paths or globs (.jsonl or .jsonl.gz)
  c.data.eval_files = ""
  c.data.on_bad_record = "error"  # error | skip (skipped records are counted and reported)
  c.data.prompt_len = 128  # tokens; prompts are left-padded / truncated from the left
  c.data.response_len = 64  # tokens including the EOS; right-padded
  c.data.text_len = 256  # tokens per pretraining-text example
  c.data.max_responses = 2  # K: responses per prompt in comparison batches
  c.data.batch_size = 32  # global examples per step
  c.data.eval_batch_size = 32
  c.data.shuffle_seed = 0
  c.data.num_epochs = 1  # training data passes (the RM is trained for 1 epoch)
  # Where prepared (array_record) datasets are cached; '' = WORKDIR/data_cache.
  c.data.cache_dir = ""
  # Cut over-long prompts (keeping their end) and responses (keeping their start,
  # EOS kept last) and count them, instead of treating them as bad records.
  c.data.truncate = False

  c.optim = ml_collections.ConfigDict()
  c.optim.learning_rate = 1e-4
  c.optim.schedule = "cosine"  # constant | linear | cosine (decay to end_lr_fraction)
  c.optim.warmup_steps = 0
  c.optim.end_lr_fraction = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  # Adam epsilon 1e-5, as in the original PPO/RLHF code (Ziegler et al. 2019).
  c.optim.eps = 1e-5
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 1.0  # global-norm clipping; 0 disables
  c.optim.accum_steps = 1  # micro-batches per optimizer step (gradient accumulation)

  c.sft = ml_collections.ConfigDict()
  c.sft.steps = 1000
  # InstructGPT masks the prompt; set True to also learn to reproduce prompts.
  c.sft.include_prompt_loss = False
  c.sft.eval_every_steps = 200
  c.sft.eval_batches = 8  # 0 = the whole eval set

  c.rm = ml_collections.ConfigDict()
  c.rm.steps = -1  # -1: one epoch over the comparisons (InstructGPT, Stiennon et al.)
  c.rm.eval_every_steps = 200
  c.rm.eval_batches = 0  # 0 = the whole eval set
  # After training, set `bias` so these responses score mean 0 (and `gain` so they
  # score std 1 when normalize_gain). 'reference': demonstration / chosen responses.
  c.rm.normalize = True
  c.rm.normalize_gain = False
  c.rm.normalize_batches = 8
  # Demonstration files (format 'demonstrations') whose responses define the
  # normalisation (InstructGPT); '' uses the best-ranked response of each
  # training comparison instead (the chosen response of hh / tldr pairs).
  c.rm.normalize_files = ""
  # Initialise the RM trunk from this SFT checkpoint directory ('' = random / init_from).
  c.rm.init_checkpoint = ""

  c.ppo = ml_collections.ConfigDict()
  c.ppo.iterations = 100
  c.ppo.batch_size = 64  # rollouts (prompts) per iteration, global
  c.ppo.epochs = 4
  c.ppo.minibatches = 1  # optimizer steps per epoch
  c.ppo.clip = 0.2
  c.ppo.value_clip = 0.2
  c.ppo.vf_coef = 0.1
  c.ppo.entropy_coef = 0.0
  c.ppo.gamma = 1.0
  c.ppo.lam = 0.95
  # KL penalty: fixed beta = kl_coef, or adaptive (Ziegler et al. 2019) towards
  # kl_target nats per response with the given horizon (in episodes).
  c.ppo.kl_coef = 0.15
  c.ppo.adaptive_kl = True
  c.ppo.kl_target = 6.0
  c.ppo.kl_horizon = 10000
  c.ppo.kl_estimator = "k1"  # k1 (log-ratio) | k3 (Schulman's unbiased, non-negative)
  c.ppo.missing_eos_penalty = -1.0  # score of a response with no stop token
  c.ppo.whiten_rewards = False
  # Behaviour log-probs: the sampler's (False), or a teacher-forced pass (True;
  # worth it with bfloat16 compute, where cached decoding rounds differently).
  c.ppo.recompute_logprobs = False
  # PPO-ptx (InstructGPT): gamma_ptx * LM loss on pretraining text, same step.
  c.ppo.gamma_ptx = 0.0
  c.ppo.ptx_files = ""
  c.ppo.ptx_batch_size = 8  # pretraining sequences per minibatch
  c.ppo.ema_decay = 0.0  # EMA of policy weights (InstructGPT 0.992); 0 disables
  c.ppo.sft_checkpoint = ""  # directory of the SFT run (its checkpoints/)
  c.ppo.rm_checkpoint = ""  # directory of the RM run
  c.ppo.value_head = "keep"  # keep | reinit: the critic's head when copied from the RM
  c.ppo.eval_every_iterations = 10
  # Eval prompt batches (data.eval_batch_size prompts each) per evaluation; 0 = all.
  c.ppo.eval_batches = 4
  # Best-of-N baseline at evaluation: N SFT samples per prompt, the RM keeps one
  # (Stiennon et al. 2020). Costs N extra samplings per eval batch; 0 disables.
  c.ppo.eval_best_of_n = 0
  # Win rates at evaluation are judged by this Python callable, 'module:function':
  # score(prompt, response) -> float or judge(prompt, a, b) -> P(a better); '' = the RM.
  c.ppo.eval_judge = ""
  # Held-out pretraining text ('text' format) for the alignment tax: the LM loss of
  # the policy vs. the SFT model at evaluation. '' skips it.
  c.ppo.ptx_eval_files = ""

  c.rollout = ml_collections.ConfigDict()
  c.rollout.new_tokens = 64  # fixed count; responses are truncated at the stop token
  c.rollout.temperature = 0.7
  c.rollout.top_k = 0
  c.rollout.top_p = 1.0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1 fills the devices left over by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 10
  c.log.tensorboard = True
  c.log.progress_bar = True
  # PPO: decode this many rollouts per iteration into WORKDIR/samples.jsonl (prompt,
  # response, RM score) for reading or judging offline. 0 = none (no host transfer).
  c.log.samples_per_iteration = 0
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values a type lock cannot; raises ConfigError naming the field."""
  def check(ok: bool, field: str, problem: str):
    if not ok:
      raise ConfigError(f"config.{field}: {problem}")

  check(config.stage in STAGES, "stage", f"{config.stage!r} is not one of {STAGES}")
  check(config.data.on_bad_record in ("error", "skip"), "data.on_bad_record",
        f"{config.data.on_bad_record!r} is not 'error' or 'skip'")
  check(config.optim.schedule in ("constant", "linear", "cosine"), "optim.schedule",
        f"{config.optim.schedule!r} is not constant|linear|cosine")
  check(config.ppo.kl_estimator in ("k1", "k3"), "ppo.kl_estimator",
        f"{config.ppo.kl_estimator!r} is not k1|k3")
  check(config.ppo.value_head in ("keep", "reinit"), "ppo.value_head",
        f"{config.ppo.value_head!r} is not keep|reinit")
  check(config.rollout.temperature > 0, "rollout.temperature", "must be > 0")
  check(0 < config.rollout.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
  for field in ("data.batch_size", "data.prompt_len", "data.response_len",
                "optim.accum_steps", "ppo.epochs", "ppo.minibatches", "checkpoint.keep"):
    section, name = field.split(".")
    value = config[section][name]
    check(value > 0, field, f"must be positive, got {value}")
  check(config.ppo.batch_size % config.ppo.minibatches == 0, "ppo.minibatches",
        f"{config.ppo.minibatches} does not divide ppo.batch_size={config.ppo.batch_size}")
  check(config.data.prompt_len + config.data.response_len <= config.model.max_len,
        "model.max_len", f"{config.model.max_len} is shorter than data.prompt_len + "
        f"data.response_len = {config.data.prompt_len + config.data.response_len}")
