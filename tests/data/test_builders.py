"""TFDS builders: array_record datasets without TensorFlow, caching, build errors."""
import json
import os
import sys

import pytest

from rlhf_jax.data import builders, formats
from rlhf_jax.errors import DataError, UserError

HH = "hh-rlhf/harmless-base-test.jsonl.gz"


def write_lines(path, lines):
  with open(path, "w") as f:
    f.writelines((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
  return str(path)


@pytest.fixture(scope="module")
def hh(shared_data, tmp_path_factory):
  return builders.prepare("hh", str(shared_data / HH),
                          cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_real_hh_builds_and_reads_back(hh, shared_data):
  assert len(hh) == 2312
  assert hh.files == [str(shared_data / HH)] and hh.counter.num_skipped == 0
  assert os.path.exists(os.path.join(hh.data_dir, "rlhf_hh-train.array_record-00000-of-00001"))
  # Same records, same order, as parsing the file directly.
  direct = list(formats.read_examples(str(shared_data / HH), "hh"))
  stored = hh.read(range(len(hh)))
  assert stored == direct
  ex = hh.read([86])[0]
  assert (ex.line, ex.responses) == (87, (" ", " Sure, the address is ..."))
  assert ex.prompt.endswith("Sorry, can you tell me address again?\n\nAssistant:")
  assert "tensorflow" not in sys.modules


def test_reads_through_tfds_data_source(hh):
  """The build is a normal TFDS dataset: tfds reads it back from its directory."""
  import tensorflow_datasets as tfds
  builder = tfds.builder_from_directory(hh.data_dir)
  source = builder.as_data_source(split="train")
  record = source[0]
  assert record["line"] == 1 and list(record["ranks"]) == [0, 1]
  assert record["responses"][0].decode().startswith(" No, sorry!")
  assert builder.info.metadata["num_examples"] == 2312
  assert "tensorflow" not in sys.modules


def test_cache_reused_and_invalidated(tmp_path):
  path = write_lines(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two"}])
  cache = str(tmp_path / "cache")
  first = builders.prepare("text", path, cache_dir=cache)
  mtime = os.path.getmtime(first.data_dir)
  again = builders.prepare("text", path, cache_dir=cache)
  assert again.key == first.key and os.path.getmtime(again.data_dir) == mtime
  write_lines(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two"}, {"text": "three"}])
  changed = builders.prepare("text", path, cache_dir=cache)
  assert changed.key != first.key
  assert [ex.responses[0] for ex in changed.read(range(len(changed)))] == ["one", "two", "three"]


def test_build_error_names_file_and_line(tmp_path):
  path = write_lines(tmp_path / "c.jsonl", [{"prompt": "p", "responses": ["a", "b"],
                                             "ranks": [0, 1]},
                                            {"prompt": "p", "responses": ["a", "b"], "ranks": [0]}])
  cache = tmp_path / "cache"
  with pytest.raises(DataError) as info:
    builders.prepare("rankings", path, cache_dir=str(cache))
  assert str(info.value) == f"{path}:2: ranks: has 1 entries for 2 responses"
  # Nothing half-built is left to be mistaken for a dataset next time.
  assert not list(cache.glob("*/rlhf_rankings/1.0.0/*.array_record*"))


def test_skip_counts_survive_the_cache(tmp_path):
  path = write_lines(tmp_path / "d.jsonl", [{"prompt": "p", "response": "a"}, "{oops",
                                            {"prompt": "p"}, {"prompt": "q", "response": "b"}])
  cache = str(tmp_path / "cache")
  for _ in range(2):  # build, then cache hit
    prepared = builders.prepare("demonstrations", path, on_bad_record="skip", cache_dir=cache)
    assert [ex.line for ex in prepared.read(range(len(prepared)))] == [1, 4]
    assert prepared.counter.skipped == {"broken_json": 1, "missing_field": 1}


def test_all_records_bad_is_an_error(tmp_path):
  path = write_lines(tmp_path / "d.jsonl", ["{oops"])
  with pytest.raises(UserError, match=r"no usable records in .*d.jsonl .*\(broken_json 1\)"):
    builders.prepare("demonstrations", path, on_bad_record="skip", cache_dir=str(tmp_path))
