"""Record formats: parse JSON-lines records into one normalised `Example`.

Every data form of the RLHF papers reduces to the same shape: a prompt, zero or
more responses, and a rank per response (lower is better, equal ranks tie). The
reward model, SFT and PPO code then never see format-specific fields.

  format          record                                     Example
  demonstrations  {prompt, response}                         responses=(response,), ranks=(0,)
  hh              {chosen, rejected}                         prompt = shared dialogue up to and
                                                             including the last "\\n\\nAssistant:",
                                                             responses=(chosen, rejected), ranks=(0, 1)
  tldr            {info: {id, post, title, subreddit},       prompt = the TL;DR query, responses = the
                   summaries: [{text, policy, note}] x 2,    two summaries in file order, rank 0 for
                   choice, worker, batch, split}             summaries[choice]
  rankings        {prompt, responses: [K>=2], ranks: [K]}    as given
  prompts         {prompt, reference?}                       responses=(), reference
  text            {text}                                     prompt='', responses=(text,), ranks=(0,)

A bad record is never dropped silently: it raises `DataError` ("FILE:LINE: field:
what is wrong"), or, with `on_bad_record='skip'`, is counted by reason in a
`BadRecordCounter` that the trainer prints and writes to summary.json. Token-length
problems are found later, by the pipeline, because they depend on the tokenizer.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import logging
import os
import zlib
from typing import Any, Iterable, Iterator

from rlhf_jax.errors import ConfigError, DataError

FORMATS = ("demonstrations", "hh", "tldr", "rankings", "prompts", "text")
COMPARISON_FORMATS = ("hh", "tldr", "rankings")
ON_BAD_RECORD = ("error", "skip")

# Bump when parsing changes what a record turns into: prepared datasets are cached
# under a key that includes it, so old caches are not reused by mistake.
PARSER_VERSION = 1

ASSISTANT = "\n\nAssistant:"
TLDR_HEAD = "SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: "
TLDR_TAIL = "\n\nTL;DR:"

_log = logging.getLogger(__name__)
# How many skipped records are logged one by one before only counting them.
_LOG_FIRST_SKIPPED = 10


@dataclasses.dataclass(frozen=True)
class Example:
  """One record in normalised form.

  Attributes:
    prompt: conditioning text ('' for the text format).
    responses: candidate continuations (one for SFT and text, none for prompts).
    ranks: one rank per response; lower is better, equal ranks are ties.
    reference: a reference response for PPO prompts (e.g. the human TL;DR), or None.
    trim_span: (start, end) characters of `prompt` that may be cut at a newline to
      fit the prompt length (the Reddit post of a TL;DR query), else None.
    path, line: where the record came from, for error messages.
  """
  prompt: str
  responses: tuple[str, ...]
  ranks: tuple[int, ...]
  reference: str | None = None
  trim_span: tuple[int, int] | None = None
  path: str = ""
  line: int = 0


class BadRecordCounter:
  """Counts skipped records by reason, and truncations, for the end-of-run report.

  `skipped` holds records left out under on_bad_record='skip'. The truncation
  counts are examples whose prompt / response / text was cut to fit, and TL;DR
  posts shortened at a newline (the TL;DR recipe itself, counted for visibility).
  """

  TRUNCATIONS = ("truncated_prompts", "truncated_responses", "truncated_texts",
                 "shortened_posts")

  def __init__(self):
    self.skipped: collections.Counter[str] = collections.Counter()
    self.truncations: collections.Counter[str] = collections.Counter()

  def skip(self, error: DataError) -> None:
    """Counts one skipped record; logs the first few so the user sees examples."""
    if sum(self.skipped.values()) < _LOG_FIRST_SKIPPED:
      _log.warning("skipping bad record: %s", error)
    self.skipped[getattr(error, "reason", "other")] += 1

  def add_truncations(self, kind: str, n: int) -> None:
    if kind not in self.TRUNCATIONS:
      raise ValueError(f"unknown truncation kind {kind!r}")
    self.truncations[kind] += int(n)

  def update(self, other: "BadRecordCounter") -> None:
    self.skipped.update(other.skipped)
    self.truncations.update(other.truncations)

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def as_dict(self) -> dict[str, Any]:
    """JSON-ready: {'skipped': {reason: n}, 'skipped_total': n, 'truncated_*': n}."""
    out: dict[str, Any] = {"skipped": dict(sorted(self.skipped.items())),
                           "skipped_total": self.num_skipped}
    for kind in self.TRUNCATIONS:
      out[kind] = int(self.truncations[kind])
    return out

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "BadRecordCounter":
    counter = cls()
    counter.skipped.update({k: int(v) for k, v in d.get("skipped", {}).items()})
    for kind in cls.TRUNCATIONS:
      counter.truncations[kind] = int(d.get(kind, 0))
    return counter

  def __str__(self) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items()))
    skipped = f"skipped {self.num_skipped} bad records" + (f" ({reasons})" if reasons else "")
    cut = ", ".join(f"{k} {self.truncations[k]}" for k in self.TRUNCATIONS if self.truncations[k])
    return skipped + (f"; {cut}" if cut else "; nothing truncated")


def bad_record(path: str, line: int, field: str, problem: str, reason: str) -> DataError:
  """A DataError tagged with a short reason, the key skip mode counts it under."""
  error = DataError(path, line, field, problem)
  error.reason = reason
  return error


# ----------------------------------------------------------------------------- files


def expand_files(spec: str | Iterable[str], field: str = "data.train_files") -> list[str]:
  """Comma-separated paths or globs -> sorted, de-duplicated list of files.

  A pattern that matches nothing is a config error: silently training on fewer
  files than the user named is the kind of mistake this codebase refuses to make.
  """
  parts = spec.split(",") if isinstance(spec, str) else list(spec)
  files: list[str] = []
  for part in (p.strip() for p in parts):
    if not part:
      continue
    matches = sorted(glob.glob(os.path.expanduser(part)))
    if not matches:
      raise ConfigError(f"{field}: no file matches {part!r}")
    files.extend(m for m in matches if m not in files)
  if not files:
    raise ConfigError(f"{field}: no files given")
  return files


def read_lines(path: str) -> Iterator[tuple[int, bytes]]:
  """Yields (line number, raw bytes) for every non-blank line of a file (.gz ok).

  Blank lines are not records (a trailing newline is common), so they are passed
  over; every other line becomes a record or a DataError naming it. Parsing is
  left to the caller so that one bad line does not end the file in skip mode.
  """
  opener = gzip.open if path.endswith(".gz") else open
  lineno = 0
  try:
    with opener(path, "rb") as f:
      for lineno, raw in enumerate(f, start=1):
        if raw.strip():
          yield lineno, raw
  except (OSError, EOFError, zlib.error) as e:
    raise bad_record(path, lineno + 1, "file", f"cannot read: {e}", "unreadable") from None


def parse_line(path: str, lineno: int, raw: bytes) -> Any:
  """Decodes one line to a JSON value; bad UTF-8 or JSON raise a DataError."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    # Find which field holds the bad bytes: that is what the user has to fix.
    bad = f"byte 0x{raw[e.start]:02x} at offset {e.start} is not valid UTF-8"
    try:
      obj = json.loads(raw.decode("utf-8", errors="surrogateescape"))
    except json.JSONDecodeError:
      raise bad_record(path, lineno, "record", bad, "not_utf8") from None
    field = _find_surrogates(obj, "") or "record"
    raise bad_record(path, lineno, field, bad, "not_utf8") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise bad_record(path, lineno, "record",
                     f"not valid JSON: {e.msg} (column {e.colno})", "broken_json") from None


def _find_surrogates(obj: Any, where: str) -> str | None:
  """Path of the first string holding undecodable bytes (lone surrogates)."""
  if isinstance(obj, str):
    return where if any("\udc80" <= c <= "\udcff" for c in obj) else None
  if isinstance(obj, dict):
    for k, v in obj.items():
      found = _find_surrogates(v, f"{where}.{k}" if where else str(k))
      if found:
        return found
  if isinstance(obj, list):
    for i, v in enumerate(obj):
      found = _find_surrogates(v, f"{where}[{i}]")
      if found:
        return found
  return None


# --------------------------------------------------------------------------- records


class _Record:
  """Typed field access on one JSON object; each failure names file, line, field."""

  def __init__(self, path: str, line: int, obj: Any):
    self.path, self.line = path, line
    if not isinstance(obj, dict):
      raise self.error("record", f"expected a JSON object, got {_type_name(obj)}", "wrong_type")
    self.obj = obj

  def error(self, field: str, problem: str, reason: str) -> DataError:
    return bad_record(self.path, self.line, field, problem, reason)

  def get(self, field: str, types: type | tuple[type, ...], *, optional: bool = False) -> Any:
    """Value at a dotted path like 'info.post' or 'summaries[1].text'."""
    value: Any = self.obj
    where = ""
    for part in field.replace("[", ".[").split("."):
      if part.startswith("["):
        index = int(part[1:-1])
        if not isinstance(value, list):
          raise self.error(where, f"expected array, got {_type_name(value)}", "wrong_type")
        if index >= len(value):
          raise self.error(field, "missing", "missing_field")
        value, where = value[index], where + part
        continue
      if not isinstance(value, dict):
        raise self.error(where, f"expected object, got {_type_name(value)}", "wrong_type")
      if part not in value:
        if optional:
          return None
        raise self.error(field, "missing", "missing_field")
      value, where = value[part], f"{where}.{part}" if where else part
    # bool is an int subclass in Python, but true/false is never a valid rank or choice.
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
      if value is None and optional:
        return None
      names = " or ".join(_JSON_NAMES.get(t, t.__name__) for t in _tuple(types))
      raise self.error(field, f"expected {names}, got {_type_name(value)}", "wrong_type")
    return value

  def text(self, field: str, *, optional: bool = False) -> str | None:
    value = self.get(field, str, optional=optional)
    if value is not None and not value:
      raise self.error(field, "empty text", "empty_text")
    return value

  def items(self, field: str, types: type, *, min_len: int = 0) -> list:
    values = self.get(field, list)
    if len(values) < min_len:
      raise self.error(field, f"needs at least {min_len} entries, got {len(values)}",
                       "too_few_responses")
    for i in range(len(values)):
      self.get(f"{field}[{i}]", types)
    return values


def _tuple(types) -> tuple:
  return types if isinstance(types, tuple) else (types,)


# Errors speak JSON, the language of the file the user has to fix.
_JSON_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean",
               type(None): "null", int: "integer", float: "number"}


def _type_name(value: Any) -> str:
  return _JSON_NAMES.get(type(value), type(value).__name__)


def _parse_demonstration(r: _Record) -> Example:
  return Example(r.text("prompt"), (r.text("response"),), (0,))


def _parse_hh(r: _Record) -> Example:
  """Splits a dialogue pair at the last Assistant turn the two strings share.

  Searching the common prefix (rather than each string on its own) also handles
  the few HH records whose dialogues differ before the final turn: their prompt is
  the shared part and each response carries its own later turns. A response may
  be whitespace only: in harmless-base-test four preferred answers are " " (saying
  nothing beats the harmful reply), a real preference that is kept.
  """
  chosen, rejected = r.text("chosen"), r.text("rejected")
  shared = os.path.commonprefix([chosen, rejected])
  cut = shared.rfind(ASSISTANT)
  if cut < 0:
    raise r.error("chosen", f"no {ASSISTANT!r} turn shared with rejected", "no_assistant_turn")
  cut += len(ASSISTANT)
  return Example(chosen[:cut], (chosen[cut:], rejected[cut:]), (0, 1))


def _parse_tldr(r: _Record) -> Example:
  """Builds the TL;DR query of Stiennon et al.; the post may later be cut to fit."""
  r.get("info", dict)
  r.text("info.id")
  post, title, subreddit = r.text("info.post"), r.text("info.title"), r.text("info.subreddit")
  summaries = r.get("summaries", list)
  if len(summaries) != 2:
    raise r.error("summaries", f"expected 2 summaries, got {len(summaries)}",
                  "too_few_responses" if len(summaries) < 2 else "wrong_count")
  texts = []
  for i in range(2):
    r.get(f"summaries[{i}]", dict)
    texts.append(r.text(f"summaries[{i}].text"))
    r.get(f"summaries[{i}].policy", str)
    r.get(f"summaries[{i}].note", str, optional=True)
  choice = r.get("choice", int)
  if choice not in (0, 1):
    raise r.error("choice", f"must be 0 or 1, got {choice}", "bad_choice")
  for field in ("worker", "batch", "split"):
    r.get(field, str)
  head = TLDR_HEAD.format(subreddit=subreddit, title=title)
  prompt = head + post + TLDR_TAIL
  ranks = (0, 1) if choice == 0 else (1, 0)
  return Example(prompt, tuple(texts), ranks, trim_span=(len(head), len(head) + len(post)))


def _parse_rankings(r: _Record) -> Example:
  prompt = r.text("prompt")
  responses = r.items("responses", str, min_len=2)
  for i in range(len(responses)):
    r.text(f"responses[{i}]")
  ranks = r.get("ranks", list)
  if len(ranks) != len(responses):
    raise r.error("ranks", f"has {len(ranks)} entries for {len(responses)} responses",
                  "ranks_mismatch")
  for i in range(len(ranks)):
    r.get(f"ranks[{i}]", int)
  if len(set(ranks)) == 1:
    raise r.error("ranks", "all responses tie, so the record orders nothing", "all_tied")
  return Example(prompt, tuple(responses), tuple(ranks))


def _parse_prompt(r: _Record) -> Example:
  return Example(r.text("prompt"), (), (), reference=r.text("reference", optional=True))


def _parse_text(r: _Record) -> Example:
  return Example("", (r.text("text"),), (0,))


_PARSERS = {
    "demonstrations": _parse_demonstration,
    "hh": _parse_hh,
    "tldr": _parse_tldr,
    "rankings": _parse_rankings,
    "prompts": _parse_prompt,
    "text": _parse_text,
}


def parse_record(fmt: str, path: str, line: int, obj: Any) -> Example:
  """Validates one decoded JSON record of format `fmt`; raises DataError if bad."""
  example = _PARSERS[fmt](_Record(path, line, obj))
  return dataclasses.replace(example, path=path, line=line)


def check_format(fmt: str, on_bad_record: str = "error") -> None:
  if fmt not in FORMATS:
    raise ConfigError(f"data.format: must be one of {', '.join(FORMATS)}; got {fmt!r}")
  if on_bad_record not in ON_BAD_RECORD:
    raise ConfigError(f"data.on_bad_record: must be 'error' or 'skip'; got {on_bad_record!r}")


def read_examples(files: str | Iterable[str], fmt: str, *, on_bad_record: str = "error",
                  counter: BadRecordCounter | None = None, max_responses: int | None = None,
                  field: str = "data.train_files") -> Iterator[Example]:
  """Reads and validates every record of `files` (paths/globs, comma-separated).

  Needs no TFDS, so the trainer can call it directly, e.g. to train the tokenizer
  on the training text (see `example_texts`). With on_bad_record='skip', bad
  records are counted in `counter` (pass one to see the counts) and left out.

  Args:
    files: comma-separated paths or globs, or a list of them.
    fmt: one of FORMATS.
    on_bad_record: 'error' raises the first DataError; 'skip' counts and continues.
    counter: receives the skip counts.
    max_responses: for rankings, records with more responses than this are bad
      (the batch holds at most this many per prompt).
    field: config field named in errors about `files`.
  """
  check_format(fmt, on_bad_record)
  counter = counter if counter is not None else BadRecordCounter()
  reference_check = _ReferenceCheck()
  for path in expand_files(files, field):
    try:
      for line, raw in read_lines(path):
        try:
          example = parse_record(fmt, path, line, parse_line(path, line, raw))
          if max_responses is not None and len(example.responses) > max_responses:
            raise bad_record(path, line, "responses",
                             f"{len(example.responses)} responses, more than "
                             f"data.max_responses={max_responses}", "too_many_responses")
          if fmt == "prompts":
            reference_check(example)
        except DataError as e:
          if on_bad_record == "error":
            raise
          counter.skip(e)
          continue
        yield example
    except DataError as e:
      if on_bad_record == "error" or getattr(e, "reason", "") != "unreadable":
        raise
      counter.skip(e)  # the rest of a corrupt file cannot be read line by line


class _ReferenceCheck:
  """Prompt records must all have a reference or all lack one.

  A batch either has reference arrays or not; a mix would leave some rows empty
  and the reward normalisation would silently average fewer references.
  """

  def __init__(self):
    self.first: Example | None = None

  def __call__(self, example: Example) -> None:
    if self.first is None:
      self.first = example
      return
    has = self.first.reference is not None
    if (example.reference is not None) != has:
      where = f"{self.first.path}:{self.first.line}"
      problem = f"missing, but {where} has one" if has else f"present, but {where} has none"
      raise bad_record(example.path, example.line, "reference",
                       f"{problem}; give every prompt a reference or none", "reference_mismatch")


def example_texts(examples: Iterable[Example]) -> Iterator[str]:
  """All the text of some examples (prompt, responses, reference): tokenizer input."""
  for ex in examples:
    if ex.prompt:
      yield ex.prompt
    yield from ex.responses
    if ex.reference:
      yield ex.reference
