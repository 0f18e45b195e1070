"""Evaluation of a PPO policy: score, KL, win rates, best-of-N, alignment tax.

On held-out prompts, `PPOEvaluator.evaluate` samples one response per prompt from
the policy and one from the SFT (reference) policy and reports

  eval/score, eval/sft_score, eval/reference_score   mean RM score (the missing-EOS
                                                     penalty for a response without
                                                     a stop token), like training
  eval/kl                 KL(policy || SFT) in nats per response, estimated on the
                          policy's samples as sum_t log pi(y_t) - log pi_sft(y_t)
  eval/win_rate_vs_sft, eval/win_rate_vs_reference
                          how often the judge prefers the policy's response to the
                          SFT policy's / the dataset's reference response (ties 1/2)
  eval/best_of_n_*        the baseline of Stiennon et al.: N SFT samples per prompt,
                          the one the RM scores highest kept; its score, and the
                          policy's win rate against it
  eval/ptx_loss, eval/sft_ptx_loss, eval/alignment_tax
                          LM loss on held-out pretraining text of the policy and of
                          the SFT model, and the difference (InstructGPT's
                          "alignment tax", what PPO-ptx is meant to reduce)

The judge is a Python callable on text: `judge(prompt, a, b) -> P(a better than b)`
in [0, 1] (a bool works), or a score function `score(prompt, response) -> float`
(a wins when it scores higher). Without one, responses are judged by the reward
model, the only judge a real run always has (and the one the policy optimises, so
prefer an independent judge when there is one; the bundled demo uses its gold
labeler). Decoded responses stop before their stop token.

Per-example values are gathered to the host and weighted by the batch's `weight`,
so the padding examples of the last eval batch count for nothing.
"""
from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from rlhf_jax import losses
from rlhf_jax.errors import ConfigError
from rlhf_jax.steps import rollout as rollout_lib

Judge = Callable[[str, str, str], float]
ScoreFn = Callable[[str, str], float]


# --------------------------------------------------------------------------------
# Text and judging (host side)
# --------------------------------------------------------------------------------


def decode_prompts(tokenizer, tokens, mask) -> list[str]:
  tokens, mask = np.asarray(tokens), np.asarray(mask)
  return [tokenizer.decode(t[m > 0].tolist()) for t, m in zip(tokens, mask)]


def decode_responses(tokenizer, tokens, mask, stop_token: int) -> list[str]:
  """Each response's real tokens up to, not including, its first stop token."""
  out = []
  for t, m in zip(np.asarray(tokens), np.asarray(mask)):
    ids = t[m > 0].tolist()
    if stop_token in ids:
      ids = ids[:ids.index(stop_token)]
    out.append(tokenizer.decode(ids))
  return out


def preferences(prompts: Sequence[str], a: Sequence[str], b: Sequence[str], *,
                judge: Optional[Judge] = None, score_fn: Optional[ScoreFn] = None,
                a_scores=None, b_scores=None) -> np.ndarray:
  """P(a preferred to b) per example, in [0, 1]: from `judge`, from `score_fn`
  (1 / 0.5 / 0 as a scores higher / equal / lower), or from given scores."""
  if judge is not None:
    return np.array([float(judge(p, x, y)) for p, x, y in zip(prompts, a, b)])
  if score_fn is not None:
    a_scores = [score_fn(p, x) for p, x in zip(prompts, a)]
    b_scores = [score_fn(p, y) for p, y in zip(prompts, b)]
  if a_scores is None or b_scores is None:
    raise ValueError("preferences need a judge, a score function or both sides' scores")
  a_scores, b_scores = np.asarray(a_scores, np.float64), np.asarray(b_scores, np.float64)
  return (a_scores > b_scores) + 0.5 * (a_scores == b_scores)


def win_rate(prompts, a, b, *, weights=None, **judged) -> float:
  """Weighted mean of `preferences` (see there for the judge arguments)."""
  p = preferences(prompts, a, b, **judged)
  w = np.ones(len(p)) if weights is None else np.asarray(weights, np.float64)
  return float(np.sum(p * w) / max(np.sum(w), 1e-12))


def load_judge(spec: str) -> tuple[Optional[Judge], Optional[ScoreFn]]:
  """'module:function' -> (judge, None) for 3 arguments, (None, score_fn) for 2.

  '' gives (None, None): responses are then judged by the reward model.
  """
  if not spec:
    return None, None
  module_name, _, name = spec.partition(":")
  try:
    fn = getattr(importlib.import_module(module_name), name)
  except (ImportError, AttributeError, ValueError) as e:
    raise ConfigError(f"config.ppo.eval_judge: cannot import {spec!r} ({e})") from None
  arity = len(inspect.signature(fn).parameters)
  if arity == 3:
    return fn, None
  if arity == 2:
    return None, fn
  raise ConfigError(f"config.ppo.eval_judge: {spec} takes {arity} arguments; expected "
                    "judge(prompt, a, b) or score(prompt, response)")


def best_of_n_index(scores) -> np.ndarray:
  """[N, B] scores of N candidates per prompt -> [B] index of the best (first on ties)."""
  return np.argmax(np.asarray(scores), axis=0)


# --------------------------------------------------------------------------------
# Jitted pieces (pure)
# --------------------------------------------------------------------------------


def response_scores(models: rollout_lib.Models, reward_params, prompt_tokens, prompt_mask,
                    response_tokens, response_mask, *, scoring: rollout_lib.ScoringParams,
                    reward_fn=None):
  """[B] scores exactly as in training (RM at the stop token, or the penalty)."""
  return rollout_lib.sequence_scores(
      models, reward_params, prompt_tokens, prompt_mask, response_tokens, response_mask,
      stop_token=scoring.stop_token, missing_eos_penalty=scoring.missing_eos_penalty,
      reward_fn=reward_fn)


def response_kl(policy, policy_params, reference_params, prompt_tokens, prompt_mask,
                response_tokens, response_mask, *, temperature: float):
  """[B] sum over real tokens of log pi - log pi_ref (k1) at the sampling temperature."""
  args = (prompt_tokens, prompt_mask, response_tokens, response_mask, temperature)
  logp, _ = rollout_lib.policy_logprobs(policy, policy_params, *args)
  ref_logp, _ = rollout_lib.policy_logprobs(policy, reference_params, *args)
  return jnp.sum(losses.kl_penalty(logp, ref_logp, "k1", response_mask), axis=-1)


def lm_loss_sums(policy, params, tokens, mask, weight):
  """(summed next-token NLL, token count) of a text batch: exact over batches."""
  logits = policy.apply({"params": params}, tokens, mask)
  loss, count = losses.token_cross_entropy(logits[:, :-1], tokens[:, 1:], mask[:, 1:],
                                           weight)
  return loss * count, count


# --------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------


def _host(x) -> np.ndarray:
  """A (possibly multi-host) global array, gathered to every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


class PPOEvaluator:
  """Evaluates policy params against the SFT policy on batches of prompts.

  Args:
    models: the network definitions.
    generate: a jitted sampler `generate(policy_params, prompt_tokens, prompt_mask,
      rng) -> Samples` (the trainer's rollout sampler, so its compilation is shared).
    scoring: the rollout's scoring settings (stop token, penalty, temperature).
    tokenizer: needed only with a text judge.
    judge / score_fn: see the module docstring; both None = judge by the RM.
    best_of_n: N for the best-of-N baseline (0: skip it).
    reward_fn: a programmatic reward used in place of the RM (as in training).
  """

  def __init__(self, models: rollout_lib.Models, generate: Callable,
               scoring: rollout_lib.ScoringParams, *, tokenizer=None,
               judge: Optional[Judge] = None, score_fn: Optional[ScoreFn] = None,
               best_of_n: int = 0, reward_fn=None):
    if (judge or score_fn) and tokenizer is None:
      raise ValueError("a text judge needs the tokenizer")
    self.models, self.generate, self.scoring = models, generate, scoring
    self.tokenizer, self.judge, self.score_fn = tokenizer, judge, score_fn
    self.best_of_n = int(best_of_n)
    self._scores = jax.jit(functools.partial(response_scores, models, scoring=scoring,
                                             reward_fn=reward_fn))
    self._kl = jax.jit(functools.partial(response_kl, models.policy,
                                         temperature=scoring.temperature))
    self._lm = jax.jit(functools.partial(lm_loss_sums, models.policy))

  @property
  def text_judged(self) -> bool:
    return self.judge is not None or self.score_fn is not None

  def _texts(self, prompt_tokens, prompt_mask, responses: dict) -> tuple[list, dict]:
    prompts = decode_prompts(self.tokenizer, prompt_tokens, prompt_mask)
    texts = {k: decode_responses(self.tokenizer, t, m, self.scoring.stop_token)
             for k, (t, m) in responses.items()}
    return prompts, texts

  def _prefer(self, prompts, texts, scores, a: str, b: str) -> np.ndarray:
    if self.text_judged:
      return preferences(prompts, texts[a], texts[b], judge=self.judge,
                         score_fn=self.score_fn)
    return preferences(prompts, None, None, a_scores=scores[a], b_scores=scores[b])

  def evaluate_batch(self, params: dict[str, Any], batch: dict, rng) -> dict[str, np.ndarray]:
    """Per-example values for one prompt batch (global arrays; host numpy out)."""
    pt, pm = batch["prompt_tokens"], batch["prompt_mask"]
    policy_rng, sft_rng, bon_rng = jax.random.split(rng, 3)
    samples = {"policy": self.generate(params["policy"], pt, pm, policy_rng),
               "sft": self.generate(params["reference"], pt, pm, sft_rng)}
    responses = {k: (s.tokens, s.mask) for k, s in samples.items()}
    if "reference_tokens" in batch:
      responses["reference"] = (batch["reference_tokens"], batch["reference_mask"])
    reward = params.get("reward")
    scores = {k: _host(self._scores(reward, pt, pm, t, m)) for k, (t, m) in responses.items()}
    out = {"weight": _host(batch["weight"]),
           "kl": _host(self._kl(params["policy"], params["reference"], pt, pm,
                                *responses["policy"])),
           "length": _host(jnp.sum(samples["policy"].mask, axis=-1)),
           "has_eos": _host(rollout_lib.has_stop_token(*responses["policy"],
                                                       self.scoring.stop_token))}
    out.update({f"{k}_score": v for k, v in scores.items()})

    if self.best_of_n:  # N SFT samples per prompt; the RM picks one
      candidates = [self.generate(params["reference"], pt, pm, jax.random.fold_in(bon_rng, i))
                    for i in range(self.best_of_n)]
      cand_scores = np.stack([_host(self._scores(reward, pt, pm, c.tokens, c.mask))
                              for c in candidates])
      best = best_of_n_index(cand_scores)
      pick = lambda xs: np.stack([_host(x) for x in xs])[best, np.arange(len(best))]
      responses["best_of_n"] = (pick([c.tokens for c in candidates]),
                                pick([c.mask for c in candidates]))
      scores["best_of_n"] = out["best_of_n_score"] = cand_scores[best, np.arange(len(best))]

    prompts, texts = None, None
    if self.text_judged:
      prompts, texts = self._texts(_host(pt), _host(pm),
                                   {k: (_host(t), _host(m)) for k, (t, m) in responses.items()})
      if self.score_fn is not None:
        for k in responses:
          out[f"{k}_judge_score"] = np.array(
              [self.score_fn(p, r) for p, r in zip(prompts, texts[k])])
    for other in ("sft", "reference", "best_of_n"):
      if other in responses:
        out[f"win_vs_{other}"] = self._prefer(prompts, texts, scores, "policy", other)
    if "best_of_n" in responses and "reference" in responses:
      out["best_of_n_win_vs_reference"] = self._prefer(prompts, texts, scores, "best_of_n",
                                                       "reference")
    return out

  def evaluate(self, params: dict[str, Any], batches: Iterable[dict], rng,
               text_batches: Iterable[dict] = ()) -> dict[str, float]:
    """Weighted means over all prompt batches, plus the alignment tax on text.

    `params` holds 'policy', 'reference' (SFT) and 'reward' (unless a reward_fn is
    used); batches are sharded prompt batches (with 'weight', optionally
    'reference_tokens'/'reference_mask'); text batches have 'tokens', 'mask', 'weight'.
    """
    rows = [self.evaluate_batch(params, b, jax.random.fold_in(rng, i))
            for i, b in enumerate(batches)]
    metrics = {}
    if rows:
      cat = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
      w = cat.pop("weight").astype(np.float64)
      mean = lambda v: float(np.sum(v * w) / max(np.sum(w), 1e-12))
      names = {"policy_score": "score", "kl": "kl", "length": "response_length",
               "win_vs_sft": "win_rate_vs_sft", "win_vs_reference": "win_rate_vs_reference",
               "win_vs_best_of_n": "win_rate_vs_best_of_n",
               "policy_judge_score": "judge_score",
               "best_of_n_win_vs_reference": "best_of_n_win_rate_vs_reference"}
      for key, values in cat.items():
        metrics["eval/" + names.get(key, key)] = mean(values)
      metrics["eval/no_eos_fraction"] = 1.0 - metrics.pop("eval/has_eos")
      metrics["eval/num_prompts"] = float(np.sum(w))
    policy_sums = sft_sums = None
    for b in text_batches:
      args = (b["tokens"], b["mask"], b["weight"])
      p, s = self._lm(params["policy"], *args), self._lm(params["reference"], *args)
      policy_sums = p if policy_sums is None else jax.tree.map(jnp.add, policy_sums, p)
      sft_sums = s if sft_sums is None else jax.tree.map(jnp.add, sft_sums, s)
    if policy_sums is not None:
      (p_nll, p_n), (s_nll, s_n) = jax.device_get((policy_sums, sft_sums))
      metrics["eval/ptx_loss"] = float(p_nll / max(p_n, 1.0))
      metrics["eval/sft_ptx_loss"] = float(s_nll / max(s_n, 1.0))
      metrics["eval/alignment_tax"] = metrics["eval/ptx_loss"] - metrics["eval/sft_ptx_loss"]
    return metrics
