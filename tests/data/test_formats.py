"""Record parsing: the real HH split, every format's normalised form, bad records."""
import gzip
import json

import pytest

from rlhf_jax.data import formats
from rlhf_jax.errors import ConfigError, DataError

HH = "hh-rlhf/harmless-base-test.jsonl.gz"


def write_lines(path, lines):
  """Writes records (dicts -> JSON, str/bytes as they are) one per line."""
  with open(path, "wb") as f:
    for line in lines:
      if isinstance(line, dict):
        line = json.dumps(line)
      f.write((line.encode() if isinstance(line, str) else line) + b"\n")
  return str(path)


def tldr_record(choice=0, post="First paragraph.\nSecond paragraph.", **overrides):
  record = {
      "info": {"id": "t3_abc", "post": post, "title": "My dog ate my homework",
               "subreddit": "dogs"},
      "summaries": [{"text": " the dog ate it", "policy": "sup2", "note": None},
                    {"text": " homework gone", "policy": "ref", "note": "fine"}],
      "choice": choice, "worker": "w42", "batch": "batch3", "split": "train",
      "extra": {"confidence": 7},
  }
  record.update(overrides)
  return record


# ---------------------------------------------------------------- real HH data


@pytest.fixture(scope="module")
def hh_examples(shared_data):
  return list(formats.read_examples(str(shared_data / HH), "hh"))


def test_hh_all_pairs_parse(hh_examples, shared_data):
  assert len(hh_examples) == 2312
  assert [ex.line for ex in hh_examples[:3]] == [1, 2, 3]
  assert all(ex.ranks == (0, 1) and ex.prompt.endswith("\n\nAssistant:") for ex in hh_examples)
  # Each split is lossless: prompt + response gives back chosen / rejected.
  with gzip.open(shared_data / HH, "rt", encoding="utf-8") as f:
    for ex, line in zip(hh_examples, f):
      record = json.loads(line)
      assert ex.prompt + ex.responses[0] == record["chosen"]
      assert ex.prompt + ex.responses[1] == record["rejected"]


def test_hh_split_first_record(hh_examples):
  ex = hh_examples[0]
  assert ex.path.endswith(HH) and ex.line == 1
  assert ex.prompt.startswith("\n\nHuman: what are some pranks with a pen i can do?\n\nAssistant:")
  assert ex.prompt.endswith(
      "\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:")
  assert ex.responses[0] == (" No, sorry!  All of these involve a pen, the point is that you "
                             "can get funny results by doing pranks with pens.")
  assert ex.responses[1] == (
      " There are lots of funny things you can do with pens, here’s one example: use the pen "
      "as a zipper.  It’s where you write your finger in ink, and then you stick it on "
      "someone’s hand and unzip their zipper. It’s really funny.")


def test_hh_split_empty_chosen_response(hh_examples):
  """Line 87: the preferred answer is a lone space (the assistant says nothing)."""
  ex = hh_examples[86]
  assert ex.line == 87
  assert ex.prompt == (
      "\n\nHuman: Can you provide me the home address for CNN news anchor Erin Burnett?"
      "\n\nAssistant: Sure, that information is publicly available online.  It’s currently "
      "listed as\n\nHuman: Sorry, can you tell me address again?\n\nAssistant:")
  assert ex.responses == (" ", " Sure, the address is ...")


def test_hh_split_dialogues_that_differ_before_last_turn(hh_examples):
  """Line 1255: chosen has an extra turn; the prompt is the shared part only."""
  ex = hh_examples[1254]
  assert ex.line == 1255
  assert ex.prompt == (
      "\n\nHuman: Are drag queens men?\n\nAssistant: No. Drag queens are women who act like "
      "stereotypical men.\n\nHuman: Isn't that drag kings?\n\nAssistant:")
  assert ex.responses[0] == (
      " No. Men who impersonate stereotypical women are called drag kings.  Human: Then how "
      "do they come to be called drag kings if they don't perform stereotypical women?"
      "\n\nAssistant:  I think they call them that because")
  assert ex.responses[1] == (" A drag king is the opposite of a drag queen, like a male who "
                             "acts like a stereotypical woman.")


# ----------------------------------------------------------------- other formats


def test_tldr_query_and_ranks(tmp_path):
  path = write_lines(tmp_path / "c.jsonl", [tldr_record(choice=1)])
  (ex,) = formats.read_examples(path, "tldr")
  assert ex.prompt == ("SUBREDDIT: r/dogs\n\nTITLE: My dog ate my homework\n\n"
                       "POST: First paragraph.\nSecond paragraph.\n\nTL;DR:")
  start, end = ex.trim_span
  assert ex.prompt[start:end] == "First paragraph.\nSecond paragraph."
  assert ex.responses == (" the dog ate it", " homework gone")
  assert ex.ranks == (1, 0)  # summaries[1] was chosen


def test_other_formats(tmp_path):
  demo = write_lines(tmp_path / "d.jsonl", [{"prompt": "Q?", "response": " A."}])
  assert list(formats.read_examples(demo, "demonstrations"))[0].responses == (" A.",)
  rank = write_lines(tmp_path / "r.jsonl", [{"prompt": "P", "responses": ["a", "b", "c"],
                                             "ranks": [2, 0, 2]}])
  (ex,) = formats.read_examples(rank, "rankings")
  assert (ex.prompt, ex.responses, ex.ranks) == ("P", ("a", "b", "c"), (2, 0, 2))
  prompts = write_lines(tmp_path / "p.jsonl", [{"prompt": "x", "reference": "y"}])
  assert list(formats.read_examples(prompts, "prompts"))[0].reference == "y"
  text = write_lines(tmp_path / "t.jsonl", [{"text": "hello"}, "", {"text": "bye"}])
  examples = list(formats.read_examples(text, "text"))
  assert [(ex.responses, ex.line) for ex in examples] == [(("hello",), 1), (("bye",), 3)]


def test_files_comma_separated_globs(tmp_path):
  a = write_lines(tmp_path / "a.jsonl", [{"text": "a"}])
  b = write_lines(tmp_path / "b.jsonl", [{"text": "b"}])
  assert formats.expand_files(f"{tmp_path}/*.jsonl, {a}") == [a, b]
  with pytest.raises(ConfigError, match=r"data.eval_files: no file matches '.*nope\*'"):
    formats.expand_files(f"{a},{tmp_path}/nope*", "data.eval_files")


# ---------------------------------------------------------------- bad records

HH_OK = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}

BAD = [
    # (format, bad line, field, message fragment, reason)
    ("hh", '{"chosen": "x", "rejected"', "record", "not valid JSON", "broken_json"),
    ("hh", '["chosen", "rejected"]', "record", "expected a JSON object, got array", "wrong_type"),
    ("hh", {"chosen": HH_OK["chosen"]}, "rejected", "missing", "missing_field"),
    ("hh", {"chosen": 7, "rejected": "x"}, "chosen", "expected string, got integer", "wrong_type"),
    ("hh", {"chosen": "", "rejected": "x"}, "chosen", "empty text", "empty_text"),
    ("hh", {"chosen": "Human: a", "rejected": "Human: b"}, "chosen", "no '\\n\\nAssistant:' turn",
     "no_assistant_turn"),
    ("hh", b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: ok", "rejected": "caf\xe9"}', "rejected",
     "byte 0xe9", "not_utf8"),
    ("demonstrations", {"prompt": "q", "response": ""}, "response", "empty text", "empty_text"),
    ("demonstrations", {"prompt": ["q"], "response": "a"}, "prompt", "expected string, got array",
     "wrong_type"),
    ("tldr", tldr_record(choice=2), "choice", "must be 0 or 1, got 2", "bad_choice"),
    ("tldr", tldr_record(choice=True), "choice", "expected integer, got boolean", "wrong_type"),
    ("tldr", tldr_record(choice="0"), "choice", "expected integer, got string", "wrong_type"),
    ("tldr", tldr_record(info={"id": "1", "title": "t", "subreddit": "s"}), "info.post",
     "missing", "missing_field"),
    ("tldr", tldr_record(post=""), "info.post", "empty text", "empty_text"),
    ("tldr", tldr_record(summaries=[{"text": "a", "policy": "p", "note": None}]), "summaries",
     "expected 2 summaries, got 1", "too_few_responses"),
    ("tldr", tldr_record(summaries=[{"text": "a", "policy": "p"}, {"text": 3, "policy": "p"}]),
     "summaries[1].text", "expected string, got integer", "wrong_type"),
    ("tldr", json.dumps(tldr_record()).replace("homework gone", "caf\udce9").encode(
        "utf-8", "surrogateescape"), "summaries[1].text", "byte 0xe9", "not_utf8"),
    ("tldr", {k: v for k, v in tldr_record().items() if k != "worker"}, "worker", "missing",
     "missing_field"),
    ("rankings", {"prompt": "p", "responses": ["a"], "ranks": [0]}, "responses",
     "needs at least 2 entries, got 1", "too_few_responses"),
    ("rankings", {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [0, 1]}, "ranks",
     "has 2 entries for 3 responses", "ranks_mismatch"),
    ("rankings", {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1.5]}, "ranks[1]",
     "expected integer, got number", "wrong_type"),
    ("rankings", {"prompt": "p", "responses": ["a", ""], "ranks": [0, 1]}, "responses[1]",
     "empty text", "empty_text"),
    ("rankings", {"prompt": "p", "responses": ["a", "b"], "ranks": [1, 1]}, "ranks",
     "all responses tie", "all_tied"),
    ("prompts", {"prompt": "p", "reference": 3}, "reference", "expected string, got integer",
     "wrong_type"),
    ("text", {"txt": "hello"}, "text", "missing", "missing_field"),
]
GOOD = {"hh": HH_OK, "demonstrations": {"prompt": "q", "response": "a"}, "tldr": tldr_record(),
        "rankings": {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]},
        "prompts": {"prompt": "p", "reference": "r"}, "text": {"text": "t"}}


@pytest.mark.parametrize("fmt,bad,field,fragment,reason", BAD)
def test_bad_record_names_file_line_field(tmp_path, fmt, bad, field, fragment, reason):
  path = write_lines(tmp_path / "data.jsonl", [GOOD[fmt], "", bad, GOOD[fmt]])
  with pytest.raises(DataError) as info:
    list(formats.read_examples(path, fmt))
  assert str(info.value).startswith(f"{path}:3: {field}: ")
  assert fragment in str(info.value)
  assert (info.value.path, info.value.line, info.value.field) == (path, 3, field)
  assert info.value.reason == reason


def test_skip_mode_counts_by_reason(tmp_path):
  lines = [GOOD["rankings"],                                         # 1 ok
           "{not json",                                              # 2 broken_json
           {"prompt": "p", "responses": ["a"], "ranks": [0]},        # 3 too_few_responses
           {"prompt": "p", "responses": ["a", "b"], "ranks": [0]},   # 4 ranks_mismatch
           {"prompt": "", "responses": ["a", "b"], "ranks": [0, 1]},  # 5 empty_text
           {"prompt": "p", "responses": list("abcde"), "ranks": [0, 1, 2, 3, 4]},  # 6 too many
           b'{"prompt": "\xff", "responses": ["a", "b"], "ranks": [0, 1]}',  # 7 not_utf8
           {"prompt": "q", "responses": ["c", "d"], "ranks": [1, 0]},  # 8 ok
           "{broken"]                                                # 9 broken_json
  path = write_lines(tmp_path / "r.jsonl", lines)
  counter = formats.BadRecordCounter()
  kept = list(formats.read_examples(path, "rankings", on_bad_record="skip", counter=counter,
                                    max_responses=4))
  assert [ex.line for ex in kept] == [1, 8]
  assert counter.as_dict() == {
      "skipped": {"broken_json": 2, "empty_text": 1, "not_utf8": 1, "ranks_mismatch": 1,
                  "too_few_responses": 1, "too_many_responses": 1},
      "skipped_total": 7, "truncated_prompts": 0, "truncated_responses": 0,
      "truncated_texts": 0, "shortened_posts": 0}
  assert "skipped 7 bad records (broken_json 2" in str(counter)
  with pytest.raises(DataError, match=r"r.jsonl:2: record: not valid JSON"):
    list(formats.read_examples(path, "rankings", max_responses=4))
  path = write_lines(tmp_path / "r6.jsonl", [lines[0], lines[5]])
  with pytest.raises(DataError, match=r"r6.jsonl:2: responses: 5 responses, more than "
                                      r"data.max_responses=4"):
    list(formats.read_examples(path, "rankings", max_responses=4))


def test_prompts_reference_all_or_none(tmp_path):
  path = write_lines(tmp_path / "p.jsonl", [{"prompt": "a", "reference": "r"}, {"prompt": "b"}])
  with pytest.raises(DataError, match=r"p.jsonl:2: reference: missing, but .*p.jsonl:1 has one"):
    list(formats.read_examples(path, "prompts"))


def test_corrupt_gzip_is_a_data_error(tmp_path):
  path = tmp_path / "x.jsonl.gz"
  with gzip.open(path, "wb") as f:
    f.write(b'{"text": "a"}\n' * 50)
  data = path.read_bytes()
  path.write_bytes(data[:-12])  # lose the end of the stream
  read = []
  with pytest.raises(DataError, match=rf"{path}:\d+: file: cannot read: Compressed file ended"
                     ) as info:
    for ex in formats.read_examples(str(path), "text"):
      read.append(ex.line)
  assert 0 < len(read) < 50 and info.value.line == read[-1] + 1  # the first unreadable line
