"""Grain pipelines: prepared records -> shuffled, sharded, tokenized static batches.

    train: step t -> global positions of this process's share of global batch t
           -> epoch = position // N, a seeded permutation per epoch -> record ids
           -> read (array_record) -> tokenize -> pad -> numpy batch
    eval:  the same, in file order, one pass, the last global batch padded with
           weight-0 examples

Sharding is by position in the global stream: position g goes to process
g % process_count. Consecutive positions form one global batch, so each global
batch is a contiguous piece of the shuffled stream, each process holds an equal
share of it, and in every epoch each example is read by exactly one process. All
processes produce the same number of batches (multi-host steps stay in lockstep).
Training drops only the last partial global batch of the whole run, not one per
epoch: batches run on across epoch boundaries.

The iterator is grain's: `MapDataset.range(num_batches).map(make_batch)`, read
through `to_iter_dataset` with prefetch threads. Every batch is a pure function
of its step, so the state is just the next step: `get_state()` is a small JSON
dict and `set_state` resumes with exactly the next batch.

Lengths are checked once per dataset, before any batch, by tokenizing every
record (the "scan", cached next to the prepared data, keyed by the tokenizer and
the lengths): an over-long record is an error at start-up rather than hours in,
or with on_bad_record='skip' it is left out and counted; with data.truncate=True
it is cut and counted. Counts are global, identical on every process.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from typing import Any, Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np

from rlhf_jax.data import builders, formats
from rlhf_jax.data.tokenizer import Tokenizer, left_pad, right_pad
from rlhf_jax.errors import ConfigError, UserError

# Rank given to padding responses (response_valid == 0): worse than any real rank.
PAD_RANK = np.iinfo(np.int32).max
_FOREVER = 2**62  # steps of a training stream with num_epochs = 0
_SCAN_CHUNK = 1024


def default_data_config() -> ml_collections.ConfigDict:
  """The config.data fields this module reads, with defaults."""
  c = ml_collections.ConfigDict()
  # demonstrations | hh | tldr | rankings | prompts | text (see formats.py).
  c.format = "demonstrations"
  # Comma-separated JSON-lines paths or globs; .gz is read transparently.
  c.train_files = ""
  c.eval_files = ""
  # 'error': the first bad record stops the run with FILE:LINE: field: problem.
  # 'skip': bad records are left out, counted by reason and reported.
  c.on_bad_record = "error"
  # Cut over-long sequences (prompts keep their end, responses their start, and
  # are counted) instead of treating them as bad records.
  c.truncate = False
  # Static shapes, in tokens. Responses include the EOS token.
  c.prompt_len = 128
  c.response_len = 64
  c.text_len = 256
  # Responses per prompt in a comparison batch (rankings; hh/tldr always use 2).
  c.max_responses = 2
  # Global batch sizes, in examples; each process gets batch_size // process_count.
  c.batch_size = 32
  c.eval_batch_size = 32
  c.shuffle_seed = 0
  # Passes over the training data; 0 repeats until the trainer stops.
  c.num_epochs = 1
  # Where prepared datasets are cached ('' = $RLHF_JAX_DATA_CACHE or
  # ~/.cache/rlhf_jax/data). Keyed by the input files' paths, sizes and mtimes.
  c.cache_dir = ""
  return c


def _cfg(cfg, name: str, default: Any) -> Any:
  """Optional fields: configs written before a field existed still work."""
  return getattr(cfg, name, default)


def read_examples(data_cfg, files_field: str = "train_files",
                  counter: formats.BadRecordCounter | None = None) -> Iterator[formats.Example]:
  """Reads + validates the records of config.data.<files_field>, without TFDS.

  For the trainer's own passes over raw data, e.g. training the tokenizer on
  `formats.example_texts(read_examples(config.data))`.
  """
  return formats.read_examples(
      getattr(data_cfg, files_field), data_cfg.format,
      on_bad_record=_cfg(data_cfg, "on_bad_record", "error"), counter=counter,
      max_responses=data_cfg.max_responses if data_cfg.format == "rankings" else None,
      field=f"data.{files_field}")


def prepare(data_cfg, files_field: str = "train_files") -> builders.Prepared:
  """Builds (or reuses from the cache) the array_record dataset of a file set."""
  files = getattr(data_cfg, files_field)
  if not files:
    raise ConfigError(f"data.{files_field}: no files given")
  return builders.prepare(
      data_cfg.format, files, on_bad_record=_cfg(data_cfg, "on_bad_record", "error"),
      max_responses=data_cfg.max_responses, cache_dir=_cfg(data_cfg, "cache_dir", "") or None,
      field=f"data.{files_field}")


# ----------------------------------------------------------------------- encoding


@dataclasses.dataclass
class _Tokens:
  prompts: list[list[int]]
  shortened: np.ndarray  # bool [N]: TL;DR post cut at a newline to fit
  responses: list[list[list[int]]]
  references: list[list[int]] | None


class Encoder:
  """Turns Examples into the numpy batches of INTERFACES.md for one format."""

  def __init__(self, data_cfg, tokenizer: Tokenizer, has_reference: bool = False):
    self.fmt = data_cfg.format
    self.tok = tokenizer
    self.prompt_len, self.response_len = data_cfg.prompt_len, data_cfg.response_len
    self.text_len = data_cfg.text_len
    self.num_responses = {"hh": 2, "tldr": 2}.get(self.fmt, data_cfg.max_responses)
    self.has_reference = has_reference

  def tokenize(self, examples: Sequence[formats.Example]) -> _Tokens:
    """One batched sentencepiece call per kind of text."""
    prompts = self.tok.encode_batch([ex.prompt for ex in examples])
    shortened = np.zeros(len(examples), bool)
    for i, ex in enumerate(examples):
      if ex.trim_span and len(prompts[i]) > self.prompt_len:
        prompts[i], shortened[i] = self._fit_post(ex)
    counts = [len(ex.responses) for ex in examples]
    flat = self.tok.encode_batch([r for ex in examples for r in ex.responses])
    starts = np.cumsum([0] + counts)
    responses = [flat[starts[i]:starts[i + 1]] for i in range(len(examples))]
    references = None
    if self.has_reference:
      references = self.tok.encode_batch([ex.reference or "" for ex in examples])
    return _Tokens(prompts, shortened, responses, references)

  def _fit_post(self, ex: formats.Example) -> tuple[list[int], bool]:
    """Cuts the TL;DR post at the latest newline that makes the query fit.

    As in Stiennon et al.: drop trailing paragraphs rather than cut mid-sentence.
    Binary search over newline positions (token count grows with the prefix).
    If even the first paragraph is too long, returns that shortest query and the
    generic over-length rule (error / skip / truncate) decides.
    """
    start, end = ex.trim_span
    head, post, tail = ex.prompt[:start], ex.prompt[start:end], ex.prompt[end:]
    cuts = [j for j, c in enumerate(post) if c == "\n"]
    if not cuts:
      return self.tok.encode(ex.prompt), False
    encode = lambda j: self.tok.encode(head + post[:j] + tail)
    lo, hi, best = 0, len(cuts) - 1, None
    while lo <= hi:
      mid = (lo + hi) // 2
      ids = encode(cuts[mid])
      if len(ids) <= self.prompt_len:
        best, lo = ids, mid + 1
      else:
        hi = mid - 1
    return (best if best is not None else encode(cuts[0])), True

  def overflow(self, tokens: _Tokens) -> dict[str, np.ndarray]:
    """Per example: how many prompts / responses / texts exceed their length."""
    n = len(tokens.prompts)
    out = {k: np.zeros(n, np.int32) for k in ("prompts", "responses", "texts", "references")}
    if self.fmt == "text":
      out["texts"] = np.array([len(r[0]) + 1 > self.text_len for r in tokens.responses], np.int32)
      return out
    out["prompts"] = np.array([len(p) > self.prompt_len for p in tokens.prompts], np.int32)
    out["responses"] = np.array([sum(len(r) + 1 > self.response_len for r in rs)
                                 for rs in tokens.responses], np.int32)
    if tokens.references is not None:
      out["references"] = np.array([len(r) + 1 > self.response_len for r in tokens.references],
                                   np.int32)
    return out

  def describe_overflow(self, ex: formats.Example) -> tuple[str, str]:
    """(field, problem) for the first over-long part of `ex`, for its DataError."""
    tokens = self.tokenize([ex])
    hint = "set data.truncate=True to cut it, or data.on_bad_record='skip'"
    if self.fmt == "text":
      n = len(tokens.responses[0][0]) + 1
      return "text", f"{n} tokens with EOS, more than data.text_len={self.text_len}; {hint}"
    if len(tokens.prompts[0]) > self.prompt_len:
      field = {"hh": "chosen", "tldr": "info.post"}.get(self.fmt, "prompt")
      what = {"hh": "the dialogue before the last Assistant turn",
              "tldr": "the TL;DR query, with the post cut at its first newline"}.get(
                  self.fmt, "the prompt")
      return field, (f"{what} is {len(tokens.prompts[0])} tokens, more than "
                     f"data.prompt_len={self.prompt_len}; {hint}")
    for i, r in enumerate(tokens.responses[0]):
      if len(r) + 1 > self.response_len:
        field = {"demonstrations": "response", "hh": ("chosen", "rejected")[i],
                 "tldr": f"summaries[{i}].text", "rankings": f"responses[{i}]"}[self.fmt]
        return field, (f"response is {len(r) + 1} tokens with EOS, more than "
                       f"data.response_len={self.response_len}; {hint}")
    n = len(tokens.references[0]) + 1
    return "reference", (f"{n} tokens with EOS, more than data.response_len="
                         f"{self.response_len}; {hint}")

  def batch(self, examples: Sequence[formats.Example]) -> dict[str, np.ndarray]:
    """Static-shape arrays (masks 1 on real tokens); callers add weight/index."""
    t = self.tokenize(examples)
    tok, eos = self.tok, self.tok.eos_id
    if self.fmt == "text":
      tokens, mask, _ = right_pad([r[0] for r in t.responses], self.text_len, tok.pad_id, eos)
      return {"tokens": tokens, "mask": mask}
    out = {}
    out["prompt_tokens"], out["prompt_mask"], _ = left_pad(t.prompts, self.prompt_len, tok.pad_id)
    if self.fmt == "prompts":
      if t.references is not None:
        out["reference_tokens"], out["reference_mask"], _ = right_pad(
            t.references, self.response_len, tok.pad_id, eos)
      return out
    if self.fmt == "demonstrations":
      out["response_tokens"], out["response_mask"], _ = right_pad(
          [r[0] for r in t.responses], self.response_len, tok.pad_id, eos)
      return out
    return {**out, **self._comparisons(examples, t)}

  def _comparisons(self, examples, t: _Tokens) -> dict[str, np.ndarray]:
    """[B, K, R] responses; missing ones (fewer than K) are all padding, valid 0."""
    b, k, length = len(examples), self.num_responses, self.response_len
    flat, valid = [], np.zeros((b, k), np.int32)
    ranks = np.full((b, k), PAD_RANK, np.int32)
    for i, ex in enumerate(examples):
      n = len(ex.responses)
      flat.extend(t.responses[i])
      flat.extend([[]] * (k - n))
      valid[i, :n] = 1
      ranks[i, :n] = ex.ranks
    tokens, mask, _ = right_pad(flat, length, self.tok.pad_id, self.tok.eos_id)
    keep = valid.reshape(-1, 1)
    return {"response_tokens": (tokens * keep).reshape(b, k, length),
            "response_mask": (mask * keep).reshape(b, k, length),
            "ranks": ranks, "response_valid": valid}


# --------------------------------------------------------------------------- scan


def _scan(prepared: builders.Prepared, encoder: Encoder) -> dict[str, np.ndarray]:
  """Over-length counts of every record (cached next to the prepared data)."""
  key = json.dumps([encoder.tok.fingerprint, encoder.fmt, encoder.prompt_len,
                    encoder.response_len, encoder.text_len, encoder.has_reference])
  path = os.path.join(prepared.cache_dir, f"scan-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz")
  if os.path.exists(path):
    with np.load(path, allow_pickle=False) as f:
      return dict(f)
  parts: dict[str, list[np.ndarray]] = {}
  for start in range(0, len(prepared), _SCAN_CHUNK):
    tokens = encoder.tokenize(prepared.read(range(start, min(start + _SCAN_CHUNK, len(prepared)))))
    for name, value in {**encoder.overflow(tokens), "shortened": tokens.shortened}.items():
      parts.setdefault(name, []).append(value)
  result = {name: np.concatenate(v) for name, v in parts.items()}
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  np.savez(tmp, **result)
  os.replace(tmp, path)
  return result


def _select(prepared: builders.Prepared, encoder: Encoder, data_cfg
            ) -> tuple[np.ndarray, formats.BadRecordCounter]:
  """Indices of usable records and the full counts (build skips + lengths)."""
  scan = _scan(prepared, encoder)
  counter = formats.BadRecordCounter()
  counter.update(prepared.counter)
  counter.add_truncations("shortened_posts", scan["shortened"].sum())
  over = scan["prompts"] + scan["responses"] + scan["texts"] + scan["references"]
  kept = np.arange(len(prepared))
  if _cfg(data_cfg, "truncate", False):
    counter.add_truncations("truncated_prompts", scan["prompts"].sum())
    counter.add_truncations("truncated_responses", scan["responses"].sum() + scan["references"].sum())
    counter.add_truncations("truncated_texts", scan["texts"].sum())
  elif over.any():
    bad = np.flatnonzero(over)
    for i in bad[:1 if _cfg(data_cfg, "on_bad_record", "error") == "error" else 10]:
      ex = prepared.read([i])[0]
      field, problem = encoder.describe_overflow(ex)
      error = formats.bad_record(ex.path, ex.line, field, problem, "too_long")
      if _cfg(data_cfg, "on_bad_record", "error") == "error":
        raise error
      counter.skip(error)  # logs the first few
    counter.skipped["too_long"] += len(bad) - min(len(bad), 10)
    kept = np.flatnonzero(over == 0)
  if not len(kept):
    raise UserError(f"no usable records in {', '.join(prepared.files)} ({counter})")
  return kept, counter


# ----------------------------------------------------------------------- iterators


class DataIterator:
  """Batches of one process; `get_state`/`set_state` give exact resume.

  Attributes:
    counts: BadRecordCounter for the whole dataset (same on every process):
      records skipped at build or for length, and truncations. Print it and put
      `counts.as_dict()` in summary.json.
    num_examples: usable records in the dataset.
    num_batches: batches this iterator yields, or None if it repeats forever.
    element_spec: {name: jax.ShapeDtypeStruct} of one batch.
  """

  def __init__(self, dataset: grain.MapDataset, *, identity: dict, counts, num_examples: int,
               num_batches: int | None, element_spec: dict, prefetch: int):
    self._dataset = dataset
    self._identity = identity
    self._read_options = grain.ReadOptions(num_threads=max(prefetch, 0),
                                           prefetch_buffer_size=max(prefetch, 0))
    self._it = dataset.to_iter_dataset(self._read_options).__iter__()
    self.counts, self.num_examples, self.element_spec = counts, num_examples, element_spec
    self.num_batches = num_batches

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict:
    """JSON-serialisable position: the next batch, plus what it belongs to."""
    return {"grain": self._it.get_state(), "identity": self._identity}

  def set_state(self, state: dict) -> None:
    if state.get("identity") != self._identity:
      raise UserError("data iterator state was saved for a different data set-up "
                      f"(saved {state.get('identity')}, now {self._identity}); "
                      "resume needs the same files, seed, batch size and process count")
    self._it.set_state(state["grain"])


def _check_batch(data_cfg, field: str, process_count: int) -> int:
  size = getattr(data_cfg, field)
  if size <= 0 or size % process_count:
    raise ConfigError(f"data.{field}: {size} must be a positive multiple of the "
                      f"process count {process_count}")
  return size // process_count


def _setup(data_cfg, tokenizer, files_field):
  formats.check_format(data_cfg.format, _cfg(data_cfg, "on_bad_record", "error"))
  prepared = prepare(data_cfg, files_field)
  encoder = Encoder(data_cfg, tokenizer, has_reference=prepared.has_reference)
  kept, counts = _select(prepared, encoder, data_cfg)
  return prepared, encoder, kept, counts


def _data_identity(prepared: builders.Prepared, kept: np.ndarray) -> dict:
  """What a saved position refers to. File names and sizes, not paths or mtimes:
  a run resumed on another VM with a copy of the same data must still resume."""
  files = [[os.path.basename(f), os.path.getsize(f)] for f in prepared.files]
  return {"format": prepared.key.split("-")[0], "files": files, "examples": int(len(kept))}


def _spec(encoder: Encoder, prepared, batch: int, include_index: bool) -> dict:
  example = encoder.batch(prepared.read([0]))
  spec = {k: jax.ShapeDtypeStruct((batch,) + v.shape[1:], v.dtype) for k, v in example.items()}
  spec["weight"] = jax.ShapeDtypeStruct((batch,), np.float32)
  if include_index:
    spec["index"] = jax.ShapeDtypeStruct((batch,), np.int32)
  return spec


class _Order:
  """Global stream position -> position in `kept`.

  Training: epoch e = g // N is a seeded permutation of 0..N-1, drawn from
  (seed, e), so each epoch is reshuffled and any position is computable without
  replaying the ones before it (that is what makes resume exact and O(1)).
  Eval (shuffle=False): file order; positions past N are padding.
  Vectorised per batch: grain's per-element index pipeline (shuffle -> slice ->
  batch of indices) cost ~170 us per example, more than tokenizing it.
  """

  def __init__(self, num: int, seed: int | None):
    self.num, self.seed = num, seed
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()  # grain may call from several threads

  def _perm(self, epoch: int) -> np.ndarray:
    with self._lock:
      if epoch not in self._perms:
        if len(self._perms) >= 2:  # batches span at most two epochs at a time
          self._perms.pop(min(self._perms))
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
        self._perms[epoch] = rng.permutation(self.num)
      return self._perms[epoch]

  def __call__(self, g: np.ndarray) -> np.ndarray:
    if self.seed is None:
      return g
    epoch, j = np.divmod(g, self.num)
    out = np.empty_like(g)
    for e in np.unique(epoch):
      sel = epoch == e
      out[sel] = self._perm(int(e))[j[sel]]
    return out


class _MakeBatch:
  """grain map: local step t -> that step's numpy batch for this process.

  Step t of process p holds global positions (t * B + k) * P + p, k < B: each
  global batch is a contiguous piece of the stream, interleaved over processes.
  Positions >= len(kept) (eval padding) repeat a real example, so a model sees
  valid tokens, never an all-padding row, and get weight 0.
  """

  def __init__(self, prepared, encoder, kept, order: _Order, local: int, pi: int, pc: int,
               include_index: bool):
    self.prepared, self.encoder, self.kept, self.order = prepared, encoder, kept, order
    self.local, self.pi, self.pc = local, pi, pc
    self.include_index = include_index

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    g = (int(step) * self.local + np.arange(self.local, dtype=np.int64)) * self.pc + self.pi
    positions = self.order(g)
    real = positions < len(self.kept)
    index = self.kept[np.where(real, positions, 0)]
    batch = self.encoder.batch(self.prepared.read(index))
    batch["weight"] = real.astype(np.float32)
    if self.include_index:
      batch["index"] = np.where(real, index, -1).astype(np.int32)
    return batch


def make_train_iterator(data_cfg, tokenizer: Tokenizer, *, seed: int | None = None,
                        process_index: int | None = None, process_count: int | None = None,
                        include_index: bool = False, prefetch: int = 2) -> DataIterator:
  """Shuffled training batches of this process: config.data.train_files.

  Args:
    data_cfg: config.data (see default_data_config).
    tokenizer: the run's Tokenizer.
    seed: shuffle seed; defaults to data_cfg.shuffle_seed.
    process_index, process_count: default to jax.process_index()/process_count().
    include_index: add 'index' [B] int32, each example's record number (tests).
    prefetch: batches prepared ahead on background threads (0: none).

  Each batch holds batch_size // process_count examples, all with weight 1; the
  last partial global batch of the whole run is dropped. With num_epochs = 0
  the data repeats forever (num_batches is None).
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  local = _check_batch(data_cfg, "batch_size", pc)
  prepared, encoder, kept, counts = _setup(data_cfg, tokenizer, "train_files")
  seed = data_cfg.shuffle_seed if seed is None else seed
  if data_cfg.num_epochs < 0:
    raise ConfigError(f"data.num_epochs: {data_cfg.num_epochs} must be >= 0 (0 repeats forever)")
  epochs = data_cfg.num_epochs or None
  steps = None
  if epochs is not None:
    steps = len(kept) * epochs // data_cfg.batch_size
    if not steps:
      raise ConfigError(f"data.batch_size: {data_cfg.batch_size} is more than the "
                        f"{len(kept) * epochs} examples of data.train_files x num_epochs")
  order = _Order(len(kept), seed)
  ds = grain.MapDataset.range(steps if steps is not None else _FOREVER)
  ds = ds.map(_MakeBatch(prepared, encoder, kept, order, local, pi, pc, include_index))
  identity = {**_data_identity(prepared, kept), "seed": int(seed), "epochs": epochs,
              "batch_size": int(data_cfg.batch_size), "process": [pi, pc]}
  return DataIterator(ds, identity=identity, counts=counts, num_examples=len(kept),
                      num_batches=steps,
                      element_spec=_spec(encoder, prepared, local, include_index),
                      prefetch=prefetch)


def make_eval_iterator(data_cfg, tokenizer: Tokenizer, *, process_index: int | None = None,
                       process_count: int | None = None, include_index: bool = False,
                       prefetch: int = 2) -> DataIterator:
  """One pass over config.data.eval_files, in file order, for this process.

  The last global batch is filled with weight-0 copies of a real example, so
  every record counts once when metrics are weighted by 'weight', and every
  process yields the same number of batches. Call again for another pass.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  local = _check_batch(data_cfg, "eval_batch_size", pc)
  prepared, encoder, kept, counts = _setup(data_cfg, tokenizer, "eval_files")
  steps = -(-len(kept) // data_cfg.eval_batch_size)
  ds = grain.MapDataset.range(steps).map(
      _MakeBatch(prepared, encoder, kept, _Order(len(kept), None), local, pi, pc, include_index))
  identity = {**_data_identity(prepared, kept), "batch_size": int(data_cfg.eval_batch_size),
              "process": [pi, pc]}
  return DataIterator(ds, identity=identity, counts=counts, num_examples=len(kept),
                      num_batches=steps,
                      element_spec=_spec(encoder, prepared, local, include_index),
                      prefetch=prefetch)
