"""PPO evaluation: judging, win rates, best-of-N, KL, alignment tax."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import evaluation, losses, sampling
from rlhf_jax.errors import ConfigError
from rlhf_jax.steps import rollout as rollout_lib
from tests.steps.ppo_fixtures import STOP, prompts, tiny_models, tiny_params


class FakeTokenizer:
  """Decodes ids as space-separated numbers: texts that are easy to check."""

  def decode(self, ids):
    return " ".join(str(i) for i in ids)


def test_preferences_from_a_judge_a_score_function_or_scores():
  p = ["x", "y", "z"]
  a, b = ["1 2 3", "1", "1 2"], ["1", "1 2", "3 4"]
  longer = lambda _prompt, text: len(text.split())
  np.testing.assert_array_equal(evaluation.preferences(p, a, b, score_fn=longer), [1, 0, 0.5])
  judge = lambda _prompt, x, y: x.startswith("1 2")
  np.testing.assert_array_equal(evaluation.preferences(p, a, b, judge=judge), [1, 0, 1])
  np.testing.assert_array_equal(
      evaluation.preferences(p, None, None, a_scores=[0.1, 2, 3], b_scores=[0, 2, 4]),
      [1, 0.5, 0])
  assert evaluation.win_rate(p, a, b, score_fn=longer, weights=[1, 1, 0]) == 0.5
  np.testing.assert_array_equal(evaluation.best_of_n_index([[0, 5, 1], [2, 5, 0]]), [1, 0, 0])


def test_decode_stops_before_the_stop_token():
  tok = FakeTokenizer()
  tokens = np.array([[5, 6, STOP, 0], [7, 8, 9, 10]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
  assert evaluation.decode_responses(tok, tokens, mask, STOP) == ["5 6", "7 8 9 10"]
  assert evaluation.decode_prompts(tok, tokens, np.array([[0, 1, 1, 0], [1, 1, 1, 1]])) == [
      f"6 {STOP}", "7 8 9 10"]


def test_load_judge_by_arity():
  judge, score_fn = evaluation.load_judge("rlhf_jax.data.synthetic:gold_score")
  assert judge is None and score_fn is not None
  assert evaluation.load_judge("") == (None, None)
  with pytest.raises(ConfigError, match="eval_judge"):
    evaluation.load_judge("rlhf_jax.data.synthetic:no_such_function")
  with pytest.raises(ConfigError, match="arguments"):
    evaluation.load_judge("rlhf_jax.data.synthetic:sample_facts")


def test_evaluator_scores_kl_win_rates_best_of_n_and_alignment_tax():
  models = tiny_models()
  params = tiny_params(models)
  scoring = rollout_lib.ScoringParams(stop_token=STOP, temperature=0.7)
  sp = sampling.SamplingParams(new_tokens=5, stop_token=STOP, temperature=0.7)
  generate = jax.jit(lambda p, t, m, r: sampling.sample(models.policy, p, t, m, r, sp))
  pt, pm = prompts(4, 5, seed=3)
  ref_tokens = jnp.array([[5, 6, STOP, 0, 0]] * 4, jnp.int32)
  ref_mask = jnp.array([[1, 1, 1, 0, 0]] * 4, jnp.int32)
  weight = jnp.array([1, 1, 1, 0], jnp.float32)  # the last prompt is eval padding
  batch = {"prompt_tokens": pt, "prompt_mask": pm, "reference_tokens": ref_tokens,
           "reference_mask": ref_mask, "weight": weight}
  text = {"tokens": jnp.asarray(np.random.default_rng(0).integers(1, 32, (4, 8)), jnp.int32),
          "mask": jnp.ones((4, 8), jnp.int32), "weight": jnp.ones((4,), jnp.float32)}
  eval_params = {"policy": params["policy"], "reference": params["reference"],
                 "reward": params["reward"]}
  rng = jax.random.key(0)

  # Judged by the RM (no text judge).
  evaluator = evaluation.PPOEvaluator(models, generate, scoring, best_of_n=3)
  # `evaluate` gives batch i the key fold_in(rng, i).
  rows = evaluator.evaluate_batch(eval_params, batch, jax.random.fold_in(rng, 0))
  metrics = evaluator.evaluate(eval_params, [batch], rng, [text])
  w = np.array([1, 1, 1, 0.0])
  mean = lambda v: float(np.sum(v * w) / 3)
  assert metrics["eval/num_prompts"] == 3
  assert metrics["eval/score"] == pytest.approx(mean(rows["policy_score"]))
  assert metrics["eval/win_rate_vs_sft"] == pytest.approx(
      mean((rows["policy_score"] > rows["sft_score"]) + 0.5 * (rows["policy_score"]
                                                               == rows["sft_score"])))
  # The references all end with the stop token: the RM's score, never the penalty.
  assert np.all(rows["reference_score"] != scoring.missing_eos_penalty)
  assert rows["best_of_n_score"].shape == (4,)
  for key in ("best_of_n_score", "win_rate_vs_best_of_n", "best_of_n_win_rate_vs_reference",
              "kl", "no_eos_fraction", "response_length"):
    assert np.isfinite(metrics["eval/" + key]), key

  # The alignment tax: LM losses on the text batch, policy minus SFT.
  def lm(p):
    logits = models.policy.apply({"params": p}, text["tokens"], text["mask"])
    return float(losses.token_cross_entropy(logits[:, :-1], text["tokens"][:, 1:],
                                            text["mask"][:, 1:])[0])
  assert metrics["eval/ptx_loss"] == pytest.approx(lm(params["policy"]), rel=1e-5)
  assert metrics["eval/alignment_tax"] == pytest.approx(
      lm(params["policy"]) - lm(params["reference"]), rel=1e-4, abs=1e-6)

  # The policy evaluated against itself: KL exactly 0, no alignment tax.
  same = dict(eval_params, reference=params["policy"])
  metrics = evaluator.evaluate(same, [batch], rng, [text])
  assert metrics["eval/kl"] == 0.0 and metrics["eval/alignment_tax"] == 0.0

  # A text score function as the judge: win rates and judge scores from the text.
  n_tokens = lambda _prompt, response: float(len(response.split()))
  judged = evaluation.PPOEvaluator(models, generate, scoring, tokenizer=FakeTokenizer(),
                                   score_fn=n_tokens)
  rows = judged.evaluate_batch(eval_params, batch, rng)
  np.testing.assert_array_equal(rows["reference_judge_score"], [2, 2, 2, 2])
  policy_len = rows["policy_judge_score"]
  np.testing.assert_array_equal(rows["win_vs_reference"],
                                (policy_len > 2) + 0.5 * (policy_len == 2))
