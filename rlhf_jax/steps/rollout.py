"""PPO's experience collection: sample, score, shape rewards, estimate advantages.

One PPO iteration starts with two pure, jitted phases that the trainer times apart:

  generate  the policy samples `rollout.new_tokens` tokens after each prompt with
            the KV-cache sampler (`sampling.sample`), which truncates each response
            after its first stop token (mask 1 up to and including it).
  score     teacher-forced forwards of the policy, the frozen reference (SFT)
            policy, the value network and the reward model over prompt+response,
            then per-token rewards r_t = -beta * kl_t plus the score on the last
            real token, GAE (reverse lax.scan) and whitened advantages.

`rollout` chains the two for notebooks. Everything after a response's stop token
is padding: its log-probs, KL, values, rewards and advantages are exactly 0, and the
score lands on the stop token (the last real token), never on padding. A response
with no stop token gets `ppo.missing_eos_penalty` instead of the RM's score.

Old log-probs come from the teacher-forced pass, not from the sampler. The two
agree to ~1e-6 in float32 (tests/steps/test_rollout.py checks 1e-5), but the
update recomputes log-probs with exactly this teacher-forced computation, so at
the first minibatch the PPO ratio is exactly 1 and the clip fraction starts at 0;
under bfloat16 the KV-cache decode path differs from a full pass by far more than
1e-5, which would show up as spurious clipping. The pass costs one forward of the
policy, which we run anyway for the entropy metric, beside the reference forward.

beta (the KL coefficient) is a traced scalar argument: the host-side controller
changes it every iteration and nothing recompiles.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from rlhf_jax import losses, sampling
from rlhf_jax.models import heads
from rlhf_jax.sharding import constrain

# reward_fn(prompt_tokens, prompt_mask, response_tokens, response_mask) -> [B]
# float32 scores: a programmatic reward used in place of the reward model (toy
# tasks, gold rewards). It is traced inside the jitted scoring function, so it must
# be written in jax.numpy (wrap host code with jax.pure_callback).
RewardFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


class Models(NamedTuple):
  """The three network definitions (modules only; params are passed separately).

  The reference policy shares `policy`'s module; the value network and the reward
  model share one architecture (the critic is initialised from the RM's params).
  `reward` may be None when a `reward_fn` replaces the reward model.
  """
  policy: heads.PolicyModel
  value: heads.ValueModel
  reward: Optional[heads.RewardModel] = None


@dataclasses.dataclass(frozen=True)
class ScoringParams:
  """Static settings of the scoring phase (hashable; closed over by jit)."""
  stop_token: int
  temperature: float = 0.7  # must equal the sampling temperature
  kl_estimator: str = "k1"
  missing_eos_penalty: float = -1.0
  gamma: float = 1.0
  lam: float = 0.95
  whiten_rewards: bool = False
  # False: PPO's behaviour log-probs are the sampler's (the same float32 math as
  # a teacher-forced pass, see sampling.py); True: recompute them teacher-forced.
  recompute_logprobs: bool = False

  @classmethod
  def from_config(cls, config, *, stop_token: int) -> "ScoringParams":
    return cls(stop_token=int(stop_token), temperature=float(config.rollout.temperature),
               kl_estimator=str(config.ppo.kl_estimator),
               missing_eos_penalty=float(config.ppo.missing_eos_penalty),
               gamma=float(config.ppo.gamma), lam=float(config.ppo.lam),
               whiten_rewards=bool(config.ppo.whiten_rewards),
               recompute_logprobs=bool(config.ppo.recompute_logprobs))


# Keys of the rollout batch that the PPO update reads; all [B, ...] arrays.
UPDATE_KEYS = ("prompt_tokens", "prompt_mask", "response_tokens", "response_mask",
               "logprobs", "values", "advantages", "returns")


def _bt(x):
  """Keeps a [B, T] activation split over the batch axes inside jit."""
  return constrain(x, ("batch", "length"))


def policy_logprobs(policy: heads.PolicyModel, params, prompt_tokens, prompt_mask,
                    response_tokens, response_mask, temperature):
  """Teacher-forced log-probs of the response tokens and the logits: [B,R], [B,R,V].

  Log-probs are at the sampling temperature and 0 after the stop token.
  """
  logits = heads.response_logits(policy, params, prompt_tokens, prompt_mask,
                                 response_tokens, response_mask)
  logp = losses.logprobs_of(logits, response_tokens, temperature)
  return _bt(logp * response_mask), logits


def response_values(value: heads.ValueModel, params, prompt_tokens, prompt_mask,
                    response_tokens, response_mask):
  """V(state before response token t) for each t: [B, R], 0 after the stop token.

  The value at sequence position P-1+t has seen the prompt and response[:t], the
  same position whose logits predict response token t.
  """
  tokens, mask = heads.join_prompt_response(prompt_tokens, prompt_mask,
                                            response_tokens, response_mask)
  p, r = prompt_tokens.shape[-1], response_tokens.shape[-1]
  v = value.apply({"params": params}, tokens, mask, read=(p - 1, r))
  return _bt(v * response_mask)


def has_stop_token(response_tokens, response_mask, stop_token: int):
  """[B] bool: the response contains the stop token among its real tokens."""
  return jnp.any((response_tokens == stop_token) & (response_mask > 0), axis=-1)


def sequence_scores(models: Models, reward_params, prompt_tokens, prompt_mask,
                    response_tokens, response_mask, *, stop_token: int,
                    missing_eos_penalty: float, reward_fn: Optional[RewardFn] = None):
  """Score per response [B]: the RM (or reward_fn) output, or the missing-EOS penalty.

  The RM reads its scalar at the last real token of prompt+response, which for a
  truncated response is its stop token.
  """
  if reward_fn is not None:
    raw = reward_fn(prompt_tokens, prompt_mask, response_tokens, response_mask)
  else:
    tokens, mask = heads.join_prompt_response(prompt_tokens, prompt_mask,
                                              response_tokens, response_mask)
    raw = models.reward.apply({"params": reward_params}, tokens, mask)
  ok = has_stop_token(response_tokens, response_mask, stop_token)
  return jnp.where(ok, jnp.asarray(raw, jnp.float32), jnp.float32(missing_eos_penalty))


def score(models: Models, params: dict[str, Any], prompt_tokens, prompt_mask,
          samples: sampling.Samples, beta, *, scoring: ScoringParams,
          reward_fn: Optional[RewardFn] = None):
  """Scores sampled responses and turns them into PPO's training batch (pure).

  Args:
    models: the network definitions.
    params: {'policy', 'reference', 'value', 'reward'} param trees ('reward' is
      unused with a reward_fn).
    prompt_tokens, prompt_mask: [B, P] left-padded prompts.
    samples: the sampler's output for these prompts.
    beta: KL coefficient, a traced scalar.
    scoring: static settings.
    reward_fn: optional programmatic reward replacing the reward model.

  Returns:
    (batch, metrics): batch holds [B, ...] arrays: the UPDATE_KEYS plus
    'ref_logprobs', 'kl', 'rewards' (per token) and 'scores' [B]; metrics are
    scalar means named as in the trainer's metrics.jsonl.
  """
  tokens, mask = samples.tokens, samples.mask.astype(jnp.int32)
  maskf = mask.astype(jnp.float32)
  temp = scoring.temperature
  if scoring.recompute_logprobs:
    logp, logits = policy_logprobs(models.policy, params["policy"], prompt_tokens,
                                   prompt_mask, tokens, mask, temp)
    entropy = losses.masked_mean(losses.entropy_from_logits(logits, temp), mask)
    del logits  # [B, R, V]: let XLA free it before the next forward
  else:
    logp = _bt(samples.logprobs * mask)
    entropy = losses.masked_mean(samples.entropy, mask)
  ref_logp, _ = policy_logprobs(models.policy, params["reference"], prompt_tokens,
                                prompt_mask, tokens, mask, temp)
  values = response_values(models.value, params["value"], prompt_tokens, prompt_mask,
                           tokens, mask)
  scores = sequence_scores(models, params.get("reward"), prompt_tokens, prompt_mask,
                           tokens, mask, stop_token=scoring.stop_token,
                           missing_eos_penalty=scoring.missing_eos_penalty,
                           reward_fn=reward_fn)

  kl = losses.kl_penalty(logp, ref_logp, scoring.kl_estimator, mask)
  rewards = losses.per_token_rewards(kl, scores, mask, beta)
  if scoring.whiten_rewards:
    # Scale only: the sign of a reward carries meaning (Ziegler et al.'s option).
    rewards = losses.whiten(rewards, mask, shift_mean=False)
  advantages, returns = losses.gae(rewards, values, mask, scoring.gamma, scoring.lam)
  advantages = losses.whiten(advantages, mask)

  kl_per_response = jnp.sum(kl, axis=-1)
  lengths = jnp.sum(maskf, axis=-1)
  metrics = {
      "ppo/score": jnp.mean(scores),
      "ppo/kl": jnp.mean(kl_per_response),
      "ppo/non_score_reward": -jnp.asarray(beta, jnp.float32) * jnp.mean(kl_per_response),
      "ppo/entropy": entropy,
      "ppo/beta": jnp.asarray(beta, jnp.float32),
      "ppo/explained_variance": losses.explained_variance(values, returns, mask),
      "ppo/response_length": jnp.mean(lengths),
      "ppo/no_eos_fraction": 1.0 - jnp.mean(
          has_stop_token(tokens, mask, scoring.stop_token).astype(jnp.float32)),
      "ppo/return": losses.masked_mean(returns, mask),
      "ppo/value": losses.masked_mean(values, mask),
      "ppo/num_tokens": jnp.sum(lengths),
  }
  batch = {
      "prompt_tokens": prompt_tokens, "prompt_mask": prompt_mask,
      "response_tokens": tokens, "response_mask": mask,
      "logprobs": logp, "ref_logprobs": ref_logp, "values": values, "kl": kl,
      "rewards": rewards, "advantages": advantages, "returns": returns,
      "scores": scores,
  }
  return batch, metrics


def rollout(models: Models, params: dict[str, Any], prompt_tokens, prompt_mask, rng,
            beta, *, sampling_params: sampling.SamplingParams, scoring: ScoringParams,
            reward_fn: Optional[RewardFn] = None):
  """generate + score in one pure function (for notebooks and tests)."""
  samples = sampling.sample(models.policy, params["policy"], prompt_tokens, prompt_mask,
                            rng, sampling_params)
  return score(models, params, prompt_tokens, prompt_mask, samples, beta,
               scoring=scoring, reward_fn=reward_fn)


class RolloutFns(NamedTuple):
  """The two jitted phases; call `generate` then `score`.

  generate(policy_params, prompt_tokens, prompt_mask, rng) -> Samples
  score(params, prompt_tokens, prompt_mask, samples, beta) -> (batch, metrics)
  """
  generate: Callable
  score: Callable


def make_rollout_fns(models: Models, sampling_params: sampling.SamplingParams,
                     scoring: ScoringParams, *, reward_fn: Optional[RewardFn] = None,
                     params_sharding: Optional[dict[str, Any]] = None,
                     batch_sharding=None, replicated=None) -> RolloutFns:
  """Jits the two phases, with explicit shardings when they are given.

  Args:
    params_sharding: {'policy', 'reference', 'value', 'reward'} sharding trees.
    batch_sharding: a NamedSharding splitting [B, ...] arrays over the batch axes
      (any rank: `PartitionSpec(('data', 'fsdp'))` leaves the other axes whole).
    replicated: a NamedSharding for scalars (beta, rng, metrics).
  Without shardings the functions follow their inputs' shardings.
  """
  generate = functools.partial(sampling.sample, models.policy, sampling=sampling_params)
  score_fn = functools.partial(score, models, scoring=scoring, reward_fn=reward_fn)
  if params_sharding is None:
    return RolloutFns(jax.jit(generate), jax.jit(score_fn))
  b, r = batch_sharding, replicated
  samples_sharding = sampling.Samples(*[b] * len(sampling.Samples._fields))
  generate = jax.jit(generate, in_shardings=(params_sharding["policy"], b, b, r),
                     out_shardings=samples_sharding)
  score_fn = jax.jit(score_fn, in_shardings=(params_sharding, b, b, samples_sharding, r),
                     out_shardings=(b, r))
  return RolloutFns(generate, score_fn)
