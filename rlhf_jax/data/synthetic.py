"""A bundled synthetic summarisation task with a hidden programmatic gold labeler.

Why this exists: the demo must show, on a 2-core laptop with nothing downloaded,
that PPO against a learned reward model raises a score the policy never sees. Real
TL;DR data and real labelers are out of reach there, so this module stands in for
both (DESIGN.md section 7):

* A *post* is a few short sentences carrying 3-5 key facts -- who, did what, where,
  when, how it went -- mixed with filler sentences that carry none. Every fact is one
  word from a small closed set of slot values, and no slot value is ever used
  anywhere else, so the facts can be parsed back exactly from the prompt text and
  a tiny transformer can learn to copy them.
* *Reference summaries* are of uneven quality on purpose, like Reddit TL;DRs: some
  are concise and complete, some miss a fact, some invent one, some are padded. SFT
  on them gives a mediocre policy (gold ~0.6) with clear room to improve (1.0).
* :func:`gold_score` is the hidden labeler. Only evaluation and the simulated
  labelers (:func:`label`) call it; the policy and the reward model never do.
* :func:`label` draws noisy pairwise preferences from the gold score with a
  Bradley-Terry model whose temperature is calibrated so labels agree with the gold
  judgement ~73% of the time, as human labelers agree with each other (Stiennon et
  al. 2020, "Learning to summarize from human feedback", report ~73% inter-labeler
  agreement on TL;DR). :func:`noise_ceiling` gives the best accuracy any reward
  model can reach against such labels, for the report's "label-noise ceiling".

Everything is lowercase plain text, pure Python + numpy, and seeded with
``numpy.random.Generator`` so a seed fixes every file byte for byte.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import zlib
from typing import Iterable, Mapping, Sequence

import numpy as np

# --------------------------------------------------------------------------- lexicon

# The slots of a post, in the order a summary mentions them. "who" and "action" are
# always present (every post is about someone doing something); 1-3 of the others
# are added, so a post has K = 3..5 key facts.
SLOTS = ("who", "action", "place", "when", "outcome")
CORE_SLOTS = ("who", "action")
OPTIONAL_SLOTS = ("place", "when", "outcome")

_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday",
         "sunday")
_MONTHS = ("january", "february", "march", "april", "may", "june", "july",
           "august", "september", "october", "november", "december")

# Single-word values keep parsing exact and copying easy for a tiny model.
VALUES: Mapping[str, tuple[str, ...]] = {
    "who": ("anna", "ben", "carla", "dmitri", "elena", "felix", "greta", "hugo",
            "iris", "jonas", "kate", "liam", "maya", "nora", "omar", "priya",
            "quinn", "rosa", "sam", "tara", "umar", "vera", "wes", "zoe"),
    "action": ("cooked", "painted", "sang", "danced", "swam", "fished", "camped",
               "skated", "jogged", "studied", "knitted", "hiked", "cycled",
               "sailed", "baked", "surfed", "climbed", "juggled", "napped",
               "gardened"),
    "place": ("park", "beach", "library", "garage", "kitchen", "office", "lake",
              "market", "school", "gym", "museum", "harbor", "rooftop", "station",
              "cafe", "forest", "bridge", "farm", "hotel", "stadium"),
    "when": _DAYS + _MONTHS,
    "outcome": ("great", "terrible", "funny", "boring", "scary", "perfect",
                "awkward", "exhausting", "relaxing", "expensive", "chaotic",
                "wonderful", "strange", "lovely", "stressful", "pointless"),
}
VALUE_TO_SLOT: Mapping[str, str] = {
    v: slot for slot, vals in VALUES.items() for v in vals}

# One sentence per fact; "{v}" is the value, "{pp}" the when-phrase ("on monday").
_FACT_TEMPLATES = {
    "who": ("this is about my friend {v}.", "my roommate {v} is the main character here.",
            "so my cousin {v} came to visit.", "{v} is my neighbour and we get along."),
    "action": ("that day they {v} for hours.", "they {v} with a few of us.",
               "for once they actually {v}."),
    "place": ("it all happened at the {v}.", "we were at the {v} near my place.",
              "the whole thing was at the {v}."),
    "when": ("this was {pp}.", "it happened {pp} if i remember right."),
    "outcome": ("in the end it was {v}.", "honestly the whole thing was {v}.",
                "overall it turned out {v}."),
}
_FILLERS = (
    "i do not post here much.", "sorry for the long post.",
    "throwaway account for obvious reasons.", "some context first.",
    "i am on mobile so excuse the format.", "this has been on my mind for a while.",
    "not sure if this is the right place.", "anyway here is what happened.",
    "edit: fixed a typo.", "bear with me.", "i still think about it sometimes.",
    "my partner says i overthink things.", "it is a small thing but still.",
    "we have known each other for years.", "nothing else really matters here.",
    "you can probably guess the rest.",
)
# Padding that wordy references add around an otherwise fine summary.
_PAD_PREFIXES = ("long story short,", "so basically", "basically,",
                 "ok so basically what happened is")
_PAD_SUFFIXES = ("and that is about it.", "thanks for reading.", "lol.",
                 "which i did not expect at all.", "so yeah, that was my week.")

PROMPT_PREFIX = "POST:"
PROMPT_SUFFIX = "TL;DR:"

# --------------------------------------------------------------------- gold labeler
# gold = coverage - INVENTED_PENALTY * n_invented - brevity - GARBAGE_PENALTY * junk,
# clipped to [-1, 1]. 1 is a perfect summary, 0 an empty one, negative misleading.
INVENTED_PENALTY = 0.5  # > the 1/3 a single missed fact costs: lying is worse.
LENGTH_SLACK = 1        # words beyond the shortest complete summary ("and it was")
LENGTH_PENALTY = 0.08   # per word beyond the budget ...
MAX_LENGTH_PENALTY = 0.5  # ... capped, so length never outweighs the facts
GARBAGE_PENALTY = 0.5   # times the fraction of words outside the task lexicon

# ------------------------------------------------------------------ noisy labelers
# Stiennon et al. (2020) report ~73% agreement between TL;DR labelers; our labels
# agree with the gold judgement at that rate on reference-summary pairs.
TARGET_AGREEMENT = 0.73
# Bradley-Terry temperature on gold-score differences, calibrated with
# calibrate_label_temperature() on reference pairs (seed 0, 20000 pairs: 0.453) and
# frozen here so labels do not depend on what else a run generates.
LABEL_TEMPERATURE = 0.45

_WORD_RE = re.compile(r"[a-z]+")
_TOKEN_RE = re.compile(r"[a-z.,;:!?]+")


def _lexicon() -> frozenset[str]:
  """Every word the generator can emit: words outside it count as garbage."""
  texts = [t for ts in _FACT_TEMPLATES.values() for t in ts]
  texts += list(_FILLERS) + list(_PAD_PREFIXES) + list(_PAD_SUFFIXES)
  texts += ["at the on in it was and my friend someone went out",
            PROMPT_PREFIX.lower(), PROMPT_SUFFIX.lower()]
  words = {w for t in texts for w in _WORD_RE.findall(t.lower())}
  return frozenset(words | set(VALUE_TO_SLOT))


LEXICON = _lexicon()


@dataclasses.dataclass(frozen=True)
class Example:
  """One post: the prompt text, its key facts (slot -> value) and a reference."""
  prompt: str
  facts: Mapping[str, str]
  reference: str


# ------------------------------------------------------------------------- posts


def _when_phrase(value: str) -> str:
  return f"on {value}" if value in _DAYS else f"in {value}"


def _choice(rng: np.random.Generator, seq: Sequence):
  return seq[int(rng.integers(len(seq)))]


def sample_facts(rng: np.random.Generator) -> dict[str, str]:
  """Who and what always; 1-3 of where / when / outcome, uniformly."""
  n_optional = int(rng.integers(1, len(OPTIONAL_SLOTS) + 1))
  chosen = set(rng.choice(len(OPTIONAL_SLOTS), size=n_optional, replace=False))
  slots = list(CORE_SLOTS) + [s for i, s in enumerate(OPTIONAL_SLOTS) if i in chosen]
  return {s: _choice(rng, VALUES[s]) for s in slots}


def render_prompt(rng: np.random.Generator, facts: Mapping[str, str]) -> str:
  """Fact sentences in slot order with 2-4 fillers spliced in at random places.

  Slot order keeps the story readable ("they" comes after the person is named);
  the random filler positions mean the model must find facts, not count sentences.
  """
  sentences = []
  for slot in SLOTS:
    if slot in facts:
      template = _choice(rng, _FACT_TEMPLATES[slot])
      sentences.append(template.format(v=facts[slot], pp=_when_phrase(facts.get("when", ""))))
  n_fill = int(rng.integers(2, 5))
  for idx in rng.choice(len(_FILLERS), size=n_fill, replace=False):
    sentences.insert(int(rng.integers(len(sentences) + 1)), _FILLERS[int(idx)])
  return f"{PROMPT_PREFIX} {' '.join(sentences)} {PROMPT_SUFFIX}"


def _post_body(prompt: str) -> str:
  """The text between POST: and TL;DR: (the whole string when markers are missing)."""
  start = prompt.find(PROMPT_PREFIX)
  body = prompt[start + len(PROMPT_PREFIX):] if start >= 0 else prompt
  end = body.find(PROMPT_SUFFIX)
  return body[:end] if end >= 0 else body


def _values_in(text: str) -> list[str]:
  """Slot values mentioned in text, in order, with repeats."""
  return [w for w in _WORD_RE.findall(text.lower()) if w in VALUE_TO_SLOT]


def parse_facts(prompt: str) -> dict[str, str]:
  """Re-derives the key facts from a prompt's text (first value per slot).

  Exact for prompts made here, because slot values appear nowhere but in fact
  sentences; that is what lets gold_score work from the prompt string alone.
  """
  facts: dict[str, str] = {}
  for value in _values_in(_post_body(prompt)):
    facts.setdefault(VALUE_TO_SLOT[value], value)
  return facts


# --------------------------------------------------------------------- summaries


def _render_summary(facts: Mapping[str, str | None], outcome_joiner: str = ", ") -> str:
  """Canonical sentence; a None value drops the fact but keeps the grammar."""
  who = facts.get("who") or "someone"
  action = facts.get("action") or "went out"
  words = f"{who} {action}"
  if facts.get("place"):
    words += f" at the {facts['place']}"
  if facts.get("when"):
    words += f" {_when_phrase(facts['when'])}"
  if facts.get("outcome"):
    words += f"{outcome_joiner}it was {facts['outcome']}"
  return words + "."


def perfect_summary(facts: Mapping[str, str]) -> str:
  """The shortest complete, faithful summary: gold score exactly 1."""
  return _render_summary(facts)


def length_budget(facts: Mapping[str, str]) -> int:
  """Words a summary may use before the brevity penalty: perfect length + slack."""
  return len(perfect_summary(facts).split()) + LENGTH_SLACK


# Independent defect rates of reference summaries, chosen so about 30% are perfect
# and the mean gold score is ~0.6: SFT copies this mix, PPO has room to fix it.
P_MISS, P_INVENT, P_PAD = 0.35, 0.3, 0.35


def reference_summary(rng: np.random.Generator, facts: Mapping[str, str]) -> str:
  """A demonstration of uneven quality: may miss, invent or pad (independently)."""
  out: dict[str, str | None] = dict(facts)
  if rng.random() < P_MISS:  # drop one fact; optional ones more often
    present = list(facts)
    weights = np.array([0.5 if s in CORE_SLOTS else 1.0 for s in present])
    out[present[int(rng.choice(len(present), p=weights / weights.sum()))]] = None
  if rng.random() < P_INVENT:  # add an absent slot, or swap a value for a wrong one
    absent = [s for s in OPTIONAL_SLOTS if s not in facts]
    if absent and rng.random() < 0.5:
      slot = _choice(rng, absent)
      out[slot] = _choice(rng, VALUES[slot])
    else:
      slot = _choice(rng, list(facts))
      out[slot] = _choice(rng, [v for v in VALUES[slot] if v != facts[slot]])
  text = _render_summary(out, outcome_joiner=_choice(rng, (", ", " and ", ", ")))
  if rng.random() < P_PAD:
    kind = int(rng.integers(3))  # prefix, suffix or both
    if kind in (0, 2):
      text = f"{_choice(rng, _PAD_PREFIXES)} {text}"
    if kind in (1, 2):
      text = f"{text[:-1]}, {_choice(rng, _PAD_SUFFIXES)}"
  return text


# ------------------------------------------------------------------ gold labeler


def _is_lexical(word: str) -> bool:
  """A whitespace token made of task words and ordinary punctuation only."""
  word = word.lower()
  pieces = _WORD_RE.findall(word)
  return (bool(pieces) and _TOKEN_RE.fullmatch(word) is not None
          and all(p in LEXICON for p in pieces))


def gold_details(prompt: str, summary: str) -> dict[str, float]:
  """The gold score and its parts, for reports that explain *why* a score moved.

  coverage: fraction of the post's key facts the summary mentions (0..1).
  invented: distinct slot values in the summary that the post does not contain.
  brevity: LENGTH_PENALTY per whitespace word beyond length_budget, capped.
  garbage: fraction of words outside the task lexicon (untrained-model junk).
  """
  facts = set(_values_in(_post_body(prompt)))
  words = summary.split()
  mentioned = set(_values_in(summary))
  coverage = len(facts & mentioned) / len(facts) if facts else 0.0
  invented = len(mentioned - facts)
  budget = length_budget(parse_facts(prompt)) if facts else 2 + LENGTH_SLACK
  excess = max(0, len(words) - budget)
  brevity = min(MAX_LENGTH_PENALTY, LENGTH_PENALTY * excess)
  junk = sum(1 for w in words if not _is_lexical(w))
  garbage = junk / len(words) if words else 0.0
  score = coverage - INVENTED_PENALTY * invented - brevity - GARBAGE_PENALTY * garbage
  return {"score": float(min(1.0, max(-1.0, score))), "coverage": coverage,
          "invented": float(invented), "brevity": brevity, "garbage": garbage,
          "n_words": float(len(words))}


def gold_score(prompt: str, summary: str) -> float:
  """Hidden gold quality of summary for prompt, in [-1, 1]; deterministic.

  1 = every fact, nothing invented, within budget; 0 = empty; each missed fact
  costs 1/K, each invented fact 0.5, each word past budget 0.05 (max 0.5), junk
  up to 0.5. Works on any string: it never raises on model garbage.
  """
  return gold_details(prompt, summary)["score"]


# --------------------------------------------------------------- noisy labelers


def preference_probability(gold_a, gold_b, temperature: float = LABEL_TEMPERATURE):
  """Bradley-Terry P(a preferred over b) = sigmoid((gold_a - gold_b) / T)."""
  diff = (np.asarray(gold_a, np.float64) - np.asarray(gold_b, np.float64)) / temperature
  return 1.0 / (1.0 + np.exp(-diff))


def label(rng: np.random.Generator, prompt: str, summary_a: str, summary_b: str) -> int:
  """A simulated labeler's choice: 0 if summary_a is preferred, 1 if summary_b.

  Close calls are near coin flips and clear ones are nearly always right, as with
  people; on reference pairs the label agrees with gold ~TARGET_AGREEMENT.
  """
  p_a = preference_probability(gold_score(prompt, summary_a), gold_score(prompt, summary_b))
  return 0 if rng.random() < p_a else 1


def rank(rng: np.random.Generator, prompt: str, summaries: list[str],
         temperature: float = LABEL_TEMPERATURE) -> list[int]:
  """A simulated labeler's ranking of K summaries (InstructGPT's K-wise format).

  Returns ranks, 0 for the best. Plackett-Luce with weights exp(gold / T), drawn
  by sorting gold / T plus Gumbel noise: each pair inside a ranking is ordered
  with the Bradley-Terry probability that `label` uses for a single comparison
  (Luce's choice axiom), so a K-wise ranking is K(K-1)/2 labels of the same
  quality for one prompt.
  """
  gold = np.array([gold_score(prompt, s) for s in summaries], np.float64) / temperature
  order = np.argsort(-(gold + rng.gumbel(size=len(summaries))))
  ranks = np.empty(len(summaries), np.int64)
  ranks[order] = np.arange(len(summaries))
  return ranks.tolist()


def noise_ceiling(gold_a, gold_b, temperature: float = LABEL_TEMPERATURE) -> float:
  """Expected accuracy of the best possible reward model against noisy labels.

  For each pair the Bayes-optimal guess is the gold winner, right with probability
  sigmoid(|diff| / T) (0.5 for gold ties). Averaging over the pairs a reward model
  is evaluated on gives the "label-noise ceiling" its accuracy can approach. On
  pairs with differing gold this is also the labels' expected agreement with gold.
  """
  p = preference_probability(np.abs(np.asarray(gold_a) - np.asarray(gold_b)), 0.0,
                             temperature)
  return float(np.mean(p)) if np.size(p) else float("nan")


def _reference_pair(rng: np.random.Generator, facts: Mapping[str, str]) -> tuple[str, str]:
  """Two reference summaries with distinct texts (as a labeling interface shows)."""
  a = reference_summary(rng, facts)
  for _ in range(20):
    b = reference_summary(rng, facts)
    if b != a:
      break
  return a, b


def calibrate_label_temperature(seed: int = 0, n_pairs: int = 20000,
                                target: float = TARGET_AGREEMENT) -> float:
  """Temperature at which labels agree with gold `target` of the time on reference
  pairs with differing gold (bisection; agreement falls as T grows)."""
  rng = np.random.default_rng(seed)
  diffs = []
  for _ in range(n_pairs):
    facts = sample_facts(rng)
    prompt = render_prompt(rng, facts)
    a, b = _reference_pair(rng, facts)
    diffs.append(gold_score(prompt, a) - gold_score(prompt, b))
  diffs = np.abs(np.array(diffs))
  diffs = diffs[diffs > 1e-9]
  lo, hi = 1e-3, 10.0
  for _ in range(60):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if noise_ceiling(diffs, 0.0, mid) > target else (lo, mid)
  return 0.5 * (lo + hi)


# ------------------------------------------------------------------ dataset files


def _split_rng(seed: int, split: str) -> np.random.Generator:
  """Independent stream per split, so eval data do not change with n_train."""
  return np.random.default_rng([seed, zlib.crc32(split.encode())])


def make_examples(rng: np.random.Generator, n: int) -> list[Example]:
  """n posts, each with one reference summary of uneven quality."""
  examples = []
  for _ in range(n):
    facts = sample_facts(rng)
    examples.append(Example(render_prompt(rng, facts), facts, reference_summary(rng, facts)))
  return examples


def make_task(seed: int, n_train: int, n_eval: int) -> dict[str, list[Example]]:
  """Train and eval examples; each split has its own seeded stream."""
  return {"train": make_examples(_split_rng(seed, "train"), n_train),
          "eval": make_examples(_split_rng(seed, "eval"), n_eval)}


def make_comparisons(rng: np.random.Generator, examples: Iterable[Example]) -> list[dict]:
  """Pairwise records {"prompt", "responses": [a, b], "ranks": [r_a, r_b]}.

  Two fresh reference-quality summaries per prompt (distinct texts), ranked by a
  simulated noisy labeler: rank 0 is the preferred one (lower = better).
  """
  records = []
  for ex in examples:
    a, b = _reference_pair(rng, ex.facts)
    winner = label(rng, ex.prompt, a, b)
    records.append({"prompt": ex.prompt, "responses": [a, b],
                    "ranks": [0, 1] if winner == 0 else [1, 0]})
  return records


def _write_jsonl(path: str, records: Iterable[dict]) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  return path


def write_task_files(out_dir: str, seed: int = 0, n_train: int = 2000,
                     n_eval: int = 200, n_comparisons_train: int | None = None,
                     n_comparisons_eval: int | None = None) -> dict[str, str]:
  """Writes the task as JSON-lines files and returns {name: path}.

  demos_{train,eval}:       {"prompt", "response"}       (SFT demonstrations)
  prompts_{train,eval}:     {"prompt", "reference"}      (PPO and evaluation)
  text_{train,eval}:        {"text"}                     (tokenizer, base LM, PPO-ptx)
  comparisons_{train,eval}: {"prompt", "responses": [a, b], "ranks": [r_a, r_b]}
  Comparison prompts are fresh posts (their own stream), sized like the splits
  unless given.
  """
  os.makedirs(out_dir, exist_ok=True)
  task = make_task(seed, n_train, n_eval)
  n_cmp = {"train": n_train if n_comparisons_train is None else n_comparisons_train,
           "eval": n_eval if n_comparisons_eval is None else n_comparisons_eval}
  paths = {}
  for split, examples in task.items():
    join = lambda name: os.path.join(out_dir, f"{name}_{split}.jsonl")  # noqa: E731
    paths[f"demos_{split}"] = _write_jsonl(
        join("demos"), ({"prompt": e.prompt, "response": e.reference} for e in examples))
    paths[f"prompts_{split}"] = _write_jsonl(
        join("prompts"), ({"prompt": e.prompt, "reference": e.reference} for e in examples))
    paths[f"text_{split}"] = _write_jsonl(
        join("text"), ({"text": f"{e.prompt} {e.reference}"} for e in examples))
    rng = _split_rng(seed, f"comparisons_{split}")
    paths[f"comparisons_{split}"] = _write_jsonl(
        join("comparisons"), make_comparisons(rng, make_examples(rng, n_cmp[split])))
  return paths
