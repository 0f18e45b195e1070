"""Tests for the bundled synthetic task: the gold labeler must rank summaries the
way the demo's story needs, parse facts exactly, and the noisy labels must sit in
the human-agreement band; the files must match the record formats exactly."""
import json
import re

import numpy as np
import pytest

from rlhf_jax.data import synthetic as syn


def _example(seed=0, n_optional=None):
  """An example with a fixed number of optional facts (so tests know K)."""
  rng = np.random.default_rng(seed)
  while True:
    facts = syn.sample_facts(rng)
    if n_optional is None or len(facts) == 2 + n_optional:
      return syn.render_prompt(rng, facts), facts


def _absent_slot_value(facts):
  slot = next(s for s in syn.OPTIONAL_SLOTS if s not in facts)
  return slot, syn.VALUES[slot][0]


def test_lexicon_slot_values_are_unique_and_never_in_templates():
  # Exact parsing rests on this: a slot value may appear only in its fact sentence.
  all_values = [v for vals in syn.VALUES.values() for v in vals]
  assert len(all_values) == len(set(all_values))
  texts = [t for ts in syn._FACT_TEMPLATES.values() for t in ts]
  texts += list(syn._FILLERS) + list(syn._PAD_PREFIXES) + list(syn._PAD_SUFFIXES)
  template_words = {w for t in texts for w in re.findall(r"[a-z]+", t)}
  assert not template_words & set(all_values)
  assert 150 < len(syn.LEXICON) < 500  # "a few hundred words"


def test_gold_ranks_perfect_above_missing_above_invented():
  for seed in range(20):
    prompt, facts = _example(seed, n_optional=2)  # K = 4
    perfect = syn.perfect_summary(facts)
    missing = syn._render_summary({**facts, "place": None} if "place" in facts
                                  else {**facts, "when": None})
    slot, value = _absent_slot_value(facts)
    invented = syn._render_summary({**facts, slot: value})
    g = [syn.gold_score(prompt, s) for s in (perfect, missing, invented)]
    assert g[0] == pytest.approx(1.0)
    assert g[1] == pytest.approx(0.75)
    assert g[0] > g[1] > g[2], (perfect, missing, invented, g)
    # Even were it as short as the missing one, inventing must score lower.
    details = syn.gold_details(prompt, invented)
    assert details["coverage"] == 1.0 and details["invented"] == 1.0
    assert details["score"] + details["brevity"] < g[1]
    # Swapping a value for a wrong one both misses and invents: worst of all.
    wrong = syn._render_summary({**facts, "who": "zoe" if facts["who"] != "zoe" else "ben"})
    assert syn.gold_score(prompt, wrong) < g[2]


def test_brevity_penalty():
  prompt, facts = _example(3)
  perfect = syn.perfect_summary(facts)
  budget = syn.length_budget(facts)
  within = perfect[:-1] + " " + " ".join(["lol"] * (budget - len(perfect.split())))
  assert syn.gold_score(prompt, within) == pytest.approx(1.0)
  scores = [syn.gold_score(prompt, within + " lol" * k) for k in range(1, 20)]
  assert scores[0] == pytest.approx(1.0 - syn.LENGTH_PENALTY)
  assert all(a >= b for a, b in zip(scores, scores[1:]))
  assert scores[-1] == pytest.approx(1.0 - syn.MAX_LENGTH_PENALTY)  # capped


def test_gold_handles_garbage_and_stays_in_range():
  prompt, facts = _example(4)
  assert syn.gold_score(prompt, "") == 0.0
  assert syn.gold_score(prompt, "xq zzv ⁇ <unk>") < 0.0
  junk_and_facts = syn.perfect_summary(facts)[:-1] + " qqq zzz."
  assert syn.gold_score(prompt, junk_and_facts) < 1.0
  rng = np.random.default_rng(0)
  words = list(syn.LEXICON) + ["⁇", "\x00", "TL;DR:", "a.b", "", "\n"]
  for _ in range(300):
    text = " ".join(rng.choice(words, size=int(rng.integers(0, 80))))
    g = syn.gold_score(prompt, text)
    assert -1.0 <= g <= 1.0
    assert g == syn.gold_score(prompt, text)  # deterministic
  assert -1.0 <= syn.gold_score("not a prompt at all", "anna cooked") <= 1.0


def test_parse_facts_is_exact_for_generated_prompts():
  for seed in range(50):
    task = syn.make_task(seed, n_train=20, n_eval=5)
    for ex in task["train"] + task["eval"]:
      assert syn.parse_facts(ex.prompt) == dict(ex.facts)
      assert syn.gold_score(ex.prompt, syn.perfect_summary(ex.facts)) == 1.0


def test_noisy_labels_agree_with_gold_like_humans():
  rng = np.random.default_rng(123)
  agree, n_diff, ga, gb = 0, 0, [], []
  for ex in syn.make_examples(rng, 6000):
    a, b = syn._reference_pair(rng, ex.facts)
    g_a, g_b = syn.gold_score(ex.prompt, a), syn.gold_score(ex.prompt, b)
    ga.append(g_a)
    gb.append(g_b)
    if g_a == g_b:
      continue
    n_diff += 1
    agree += syn.label(rng, ex.prompt, a, b) == (0 if g_a > g_b else 1)
  rate = agree / n_diff
  assert 0.70 <= rate <= 0.75, rate
  ga, gb = np.array(ga), np.array(gb)
  differ = ga != gb
  assert syn.noise_ceiling(ga[differ], gb[differ]) == pytest.approx(syn.TARGET_AGREEMENT, abs=0.01)
  # Ties lower the ceiling: a tie is a coin flip for any reward model.
  assert syn.noise_ceiling(ga, gb) < syn.noise_ceiling(ga[differ], gb[differ])


def test_rankings_order_each_pair_with_the_bradley_terry_probability():
  ex = syn.make_examples(np.random.default_rng(5), 1)[0]
  summaries = [syn.perfect_summary(ex.facts),
               syn.reference_summary(np.random.default_rng(3), ex.facts), "zzz qqq"]
  golds = [syn.gold_score(ex.prompt, s) for s in summaries]
  assert len(set(golds)) == 3  # three distinct qualities: every pair is informative
  rng = np.random.default_rng(0)
  ranks = np.array([syn.rank(rng, ex.prompt, summaries) for _ in range(20000)])
  assert sorted(ranks[0].tolist()) == [0, 1, 2]
  for i, j in ((0, 1), (0, 2), (1, 2)):
    expected = syn.preference_probability(golds[i], golds[j])
    # Binomial standard error <= 0.0036 at 20,000 rankings: 0.015 is ~4 sigma.
    assert np.mean(ranks[:, i] < ranks[:, j]) == pytest.approx(expected, abs=0.015)


def test_label_temperature_matches_calibration():
  assert syn.calibrate_label_temperature(seed=7, n_pairs=4000) == pytest.approx(
      syn.LABEL_TEMPERATURE, abs=0.03)


def test_references_leave_room_for_improvement():
  examples = syn.make_task(0, n_train=2000, n_eval=0)["train"]
  g = np.array([syn.gold_score(e.prompt, e.reference) for e in examples])
  assert 0.5 < g.mean() < 0.7
  assert 0.2 < np.mean(g == 1.0) < 0.45
  prompt_words = np.array([len(e.prompt.split()) for e in examples])
  assert 30 < np.median(prompt_words) < 60 and prompt_words.max() < 80


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def test_write_task_files_formats(tmp_path):
  paths = syn.write_task_files(str(tmp_path), seed=1, n_train=30, n_eval=10,
                               n_comparisons_train=25)
  expected = {f"{kind}_{split}" for kind in ("demos", "prompts", "text", "comparisons")
              for split in ("train", "eval")}
  assert set(paths) == expected
  sizes = {"train": 30, "eval": 10}
  for name, path in paths.items():
    kind, split = name.split("_")
    records = _read_jsonl(path)
    assert len(records) == (25 if name == "comparisons_train" else sizes[split])
    for r in records:
      if kind == "demos":
        assert set(r) == {"prompt", "response"}
      elif kind == "prompts":
        assert set(r) == {"prompt", "reference"}
      elif kind == "text":
        assert set(r) == {"text"}
      else:
        assert set(r) == {"prompt", "responses", "ranks"}
        assert isinstance(r["responses"], list) and len(r["responses"]) == 2
        assert all(isinstance(x, str) and x for x in r["responses"])
        assert r["responses"][0] != r["responses"][1]
        assert sorted(r["ranks"]) == [0, 1] and all(type(x) is int for x in r["ranks"])
      assert all(isinstance(v, str) and v for v in r.values() if not isinstance(v, list))
      if "prompt" in r:
        assert r["prompt"].startswith("POST: ") and r["prompt"].endswith(" TL;DR:")
  demos = _read_jsonl(paths["demos_train"])
  prompts = _read_jsonl(paths["prompts_train"])
  texts = _read_jsonl(paths["text_train"])
  for d, p, t in zip(demos, prompts, texts):
    assert d["prompt"] == p["prompt"] and d["response"] == p["reference"]
    assert t["text"] == f"{d['prompt']} {d['response']}"


def test_comparison_file_ranks_follow_noisy_gold(tmp_path):
  paths = syn.write_task_files(str(tmp_path), seed=2, n_train=10, n_eval=2,
                               n_comparisons_train=2000)
  agree, n_diff = 0, 0
  for r in _read_jsonl(paths["comparisons_train"]):
    g = [syn.gold_score(r["prompt"], x) for x in r["responses"]]
    if g[0] != g[1]:
      n_diff += 1
      agree += r["ranks"][int(np.argmax(g))] == 0
  assert 0.66 <= agree / n_diff <= 0.80, agree / n_diff


def test_deterministic_under_seed(tmp_path):
  a = syn.write_task_files(str(tmp_path / "a"), seed=5, n_train=20, n_eval=5)
  b = syn.write_task_files(str(tmp_path / "b"), seed=5, n_train=20, n_eval=5)
  c = syn.write_task_files(str(tmp_path / "c"), seed=6, n_train=20, n_eval=5)
  read = lambda p: open(p, "rb").read()  # noqa: E731
  assert all(read(a[k]) == read(b[k]) for k in a)
  assert read(a["demos_train"]) != read(c["demos_train"])
  # Eval data do not depend on the training-set size.
  small = syn.make_task(5, n_train=3, n_eval=5)["eval"]
  big = syn.make_task(5, n_train=50, n_eval=5)["eval"]
  assert small == big
  r1, r2 = np.random.default_rng(9), np.random.default_rng(9)
  ex = small[0]
  x, y = syn._reference_pair(np.random.default_rng(0), ex.facts)
  assert [syn.label(r1, ex.prompt, x, y) for _ in range(20)] == [
      syn.label(r2, ex.prompt, x, y) for _ in range(20)]
