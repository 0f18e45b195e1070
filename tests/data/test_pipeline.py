"""Grain pipelines: real HH, fixture formats end to end, sharding, resume, lengths."""
import json

import numpy as np
import pytest

from rlhf_jax.data import formats, pipeline
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.errors import ConfigError, DataError, UserError

HH = "hh-rlhf/harmless-base-test.jsonl.gz"


def write_lines(path, lines):
  with open(path, "w") as f:
    f.writelines((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
  return str(path)


@pytest.fixture(scope="module")
def tok(shared_data):
  examples = formats.read_examples(str(shared_data / HH), "hh")
  texts = [t for _, t in zip(range(800), formats.example_texts(examples))]
  texts += ["SUBREDDIT: r/dogs\n\nTITLE: My dog\n\nPOST: a paragraph.\n\nTL;DR:"] * 20
  return Tokenizer.train(texts, vocab_size=800)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


def config(cache, **fields):
  cfg = pipeline.default_data_config()
  cfg.cache_dir = cache
  cfg.update(fields)
  return cfg


def collect(iterator):
  return [b for b in iterator]


def unpad(tokens, mask):
  return [int(t) for t, m in zip(tokens, mask) if m]


# ------------------------------------------------------------------ real HH


@pytest.fixture(scope="module")
def hh_cfg(shared_data, cache):
  return config(cache, format="hh", train_files=str(shared_data / HH),
                eval_files=str(shared_data / HH), prompt_len=96, response_len=32,
                truncate=True, batch_size=8, eval_batch_size=48)


def test_hh_epoch_two_processes_cover_dataset_once(hh_cfg, tok):
  seen = []
  for p in range(2):
    it = pipeline.make_train_iterator(hh_cfg, tok, seed=3, process_index=p, process_count=2,
                                      include_index=True)
    batches = collect(it)
    assert len(batches) == it.num_batches == 2312 // 8
    assert all(b["prompt_tokens"].shape == (4, 96) for b in batches)
    indices = np.concatenate([b["index"] for b in batches])
    assert len(indices) == 1156
    seen.append(indices)
  union = np.concatenate(seen)
  assert len(set(union.tolist())) == len(union) == 2312  # no duplicates
  assert set(union.tolist()) == set(range(2312))
  assert not np.array_equal(seen[0][:50], np.sort(seen[0][:50]))  # shuffled


def test_hh_batches_hold_the_right_text(hh_cfg, tok, shared_data):
  examples = list(formats.read_examples(str(shared_data / HH), "hh"))
  it = pipeline.make_train_iterator(hh_cfg, tok, seed=0, process_index=0, process_count=1,
                                    include_index=True)
  batch = next(it)
  for row, index in enumerate(batch["index"]):
    ex = examples[index]
    prompt_ids = tok.encode(ex.prompt)
    assert unpad(batch["prompt_tokens"][row], batch["prompt_mask"][row]) == prompt_ids[-96:]
    assert batch["prompt_mask"][row].tolist() == [0] * (96 - min(96, len(prompt_ids))) + [1] * min(
        96, len(prompt_ids))
    for k in range(2):
      ids = tok.encode(ex.responses[k])[:31] + [tok.eos_id]
      assert unpad(batch["response_tokens"][row, k], batch["response_mask"][row, k]) == ids
  np.testing.assert_array_equal(batch["ranks"], [[0, 1]] * 8)
  np.testing.assert_array_equal(batch["response_valid"], np.ones((8, 2)))
  np.testing.assert_array_equal(batch["weight"], np.ones(8, np.float32))
  # Truncations are counted over the dataset, exactly.
  expected_prompts = sum(len(tok.encode(ex.prompt)) > 96 for ex in examples)
  expected_responses = sum(len(tok.encode(r)) + 1 > 32 for ex in examples for r in ex.responses)
  assert it.counts.as_dict()["truncated_prompts"] == expected_prompts > 0
  assert it.counts.as_dict()["truncated_responses"] == expected_responses > 0


def test_hh_eval_pass_pads_last_batch(hh_cfg, tok):
  per_process = []
  for p in range(2):
    it = pipeline.make_eval_iterator(hh_cfg, tok, process_index=p, process_count=2,
                                     include_index=True)
    batches = collect(it)
    assert len(batches) == it.num_batches == 49  # ceil(2312 / 48), same on both processes
    weight = np.concatenate([b["weight"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    assert np.array_equal(weight > 0, index >= 0)
    per_process.append(index[index >= 0])
    assert batches[-1]["prompt_mask"].sum(axis=1).min() > 0  # padding rows are real tokens
  union = np.concatenate(per_process)
  assert sorted(union.tolist()) == list(range(2312))
  # 2352 slots - 2312 examples = 40 padding rows, 20 per process, weight 0.
  assert sum(len(x) for x in per_process) == 2312


def test_resume_continues_with_exactly_the_next_batch(hh_cfg, tok):
  cfg = config(hh_cfg.cache_dir, **{**hh_cfg.to_dict(), "num_epochs": 2, "batch_size": 640})
  it = pipeline.make_train_iterator(cfg, tok, seed=5, process_index=1, process_count=2)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = [next(it) for _ in range(3)]  # crosses the epoch boundary (3.6 batches/epoch)
  resumed = pipeline.make_train_iterator(cfg, tok, seed=5, process_index=1, process_count=2)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  assert len(collect(resumed)) == 1  # 2 epochs x 2312 // 640 = 7 batches in all
  other = pipeline.make_train_iterator(cfg, tok, seed=6, process_index=1, process_count=2)
  with pytest.raises(UserError, match="different data set-up"):
    other.set_state(state)


# ------------------------------------------------------------- fixture formats


def tldr_record(post, choice, summaries=(" the dog ate it", " homework gone")):
  return {"info": {"id": "t3_x", "post": post, "title": "My dog", "subreddit": "dogs"},
          "summaries": [{"text": s, "policy": "sup2", "note": None} for s in summaries],
          "choice": choice, "worker": "w1", "batch": "batch7", "split": "valid1",
          "extra": {"confidence": 6}}


def test_tldr_roundtrip(tmp_path, cache, tok):
  long_post = "My dog is nice.\n" + "He likes to run in the park every day. " * 30
  short_query = "SUBREDDIT: r/dogs\n\nTITLE: My dog\n\nPOST: My dog is nice.\n\nTL;DR:"
  prompt_len = len(tok.encode(short_query)) + 2  # fits the first paragraph only
  records = [tldr_record("A short post.", 0), tldr_record(long_post, 1),
             tldr_record("Two\nlines.", 1, (" x", " y z"))]
  path = write_lines(tmp_path / "comparisons.jsonl", records)
  cfg = config(cache, format="tldr", eval_files=path, prompt_len=prompt_len, response_len=16,
               eval_batch_size=4)
  it = pipeline.make_eval_iterator(cfg, tok, process_index=0, process_count=1)
  (batch,) = collect(it)
  queries = ["SUBREDDIT: r/dogs\n\nTITLE: My dog\n\nPOST: A short post.\n\nTL;DR:", short_query,
             "SUBREDDIT: r/dogs\n\nTITLE: My dog\n\nPOST: Two\nlines.\n\nTL;DR:"]
  for row, query in enumerate(queries):
    ids = tok.encode(query)
    assert unpad(batch["prompt_tokens"][row], batch["prompt_mask"][row]) == ids
    assert batch["prompt_mask"][row].sum() == len(ids)
    assert batch["prompt_mask"][row, -len(ids):].all()  # left padded
    assert tok.decode(batch["prompt_tokens"][row]) == query
    for k, summary in enumerate(records[row]["summaries"]):
      ids = tok.encode(summary["text"]) + [tok.eos_id]
      assert batch["response_tokens"][row, k, :len(ids)].tolist() == ids
      assert batch["response_mask"][row, k].tolist() == [1] * len(ids) + [0] * (16 - len(ids))
      assert (batch["response_tokens"][row, k, len(ids):] == tok.pad_id).all()
  np.testing.assert_array_equal(batch["ranks"][:3], [[0, 1], [1, 0], [1, 0]])
  np.testing.assert_array_equal(batch["weight"], [1, 1, 1, 0])
  assert it.counts.as_dict()["shortened_posts"] == 1
  assert it.counts.as_dict()["truncated_prompts"] == 0


def test_rankings_roundtrip(tmp_path, cache, tok):
  records = [{"prompt": "Rank these replies.", "responses": [" good", " bad", " meh"],
              "ranks": [0, 2, 1]},
             {"prompt": "Which is kind?", "responses": [" thanks", " go away"], "ranks": [0, 1]},
             {"prompt": "Ties allowed", "responses": [" a", " b", " c", " d"],
              "ranks": [1, 0, 1, 3]}]
  path = write_lines(tmp_path / "rankings.jsonl", records)
  cfg = config(cache, format="rankings", train_files=path, max_responses=4, prompt_len=12,
               response_len=8, batch_size=3, num_epochs=1)
  it = pipeline.make_train_iterator(cfg, tok, seed=0, process_index=0, process_count=1,
                                    include_index=True)
  (batch,) = collect(it)
  assert batch["response_tokens"].shape == (3, 4, 8) and batch["ranks"].shape == (3, 4)
  for row, index in enumerate(batch["index"]):
    record, k = records[index], len(records[index]["responses"])
    assert tok.decode(batch["prompt_tokens"][row]) == record["prompt"]
    assert batch["response_valid"][row].tolist() == [1] * k + [0] * (4 - k)
    assert batch["ranks"][row].tolist() == record["ranks"] + [pipeline.PAD_RANK] * (4 - k)
    for j in range(4):
      if j < k:
        ids = tok.encode(record["responses"][j]) + [tok.eos_id]
        assert unpad(batch["response_tokens"][row, j], batch["response_mask"][row, j]) == ids
        assert batch["response_mask"][row, j].sum() == len(ids)
      else:  # padding response: nothing real, all pad ids
        assert batch["response_mask"][row, j].sum() == 0
        assert (batch["response_tokens"][row, j] == tok.pad_id).all()


def test_demonstrations_prompts_text(tmp_path, cache, tok):
  demo = write_lines(tmp_path / "d.jsonl", [{"prompt": "Say hi.", "response": " Hi!"}] * 2)
  cfg = config(cache, format="demonstrations", train_files=demo, prompt_len=8, response_len=8,
               batch_size=2)
  batch = next(pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1))
  assert sorted(batch) == ["prompt_mask", "prompt_tokens", "response_mask", "response_tokens",
                           "weight"]
  assert unpad(batch["response_tokens"][0], batch["response_mask"][0]) == tok.encode(" Hi!") + [3]

  prompts = write_lines(tmp_path / "p.jsonl", [{"prompt": "Tell me", "reference": " a tale"}] * 2)
  cfg = config(cache, format="prompts", train_files=prompts, prompt_len=8, response_len=8,
               batch_size=2)
  batch = next(pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1))
  assert tok.decode(batch["reference_tokens"][1]) == " a tale"
  assert batch["reference_mask"][1].sum() == len(tok.encode(" a tale")) + 1

  text = write_lines(tmp_path / "t.jsonl", [{"text": "Plain text here."}] * 4)
  cfg = config(cache, format="text", train_files=text, text_len=16, batch_size=4)
  it = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
  batch = next(it)
  assert sorted(batch) == ["mask", "tokens", "weight"] and batch["tokens"].shape == (4, 16)
  assert unpad(batch["tokens"][0], batch["mask"][0]) == tok.encode("Plain text here.") + [3]
  assert it.element_spec["tokens"].shape == (4, 16)


# -------------------------------------------------------------------- lengths


def test_over_long_records_error_skip_or_truncate(tmp_path, cache, tok):
  short = {"prompt": "Hi", "response": " ok"}
  lines = [short, short, {"prompt": "word " * 40, "response": " ok"}, short,
           {"prompt": "Hi", "response": " long" * 40}, short]
  path = write_lines(tmp_path / "sft.jsonl", lines)
  cfg = config(cache, format="demonstrations", train_files=path, prompt_len=10, response_len=10,
               batch_size=2)
  with pytest.raises(DataError) as info:
    pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
  assert str(info.value).startswith(f"{path}:3: prompt: the prompt is ")
  assert "more than data.prompt_len=10" in str(info.value)

  only_response = write_lines(tmp_path / "sft2.jsonl", [short, lines[4]])
  cfg.train_files = only_response
  with pytest.raises(DataError, match=rf"{only_response}:2: response: response is \d+ tokens "
                                      r"with EOS, more than data.response_len=10"):
    pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)

  cfg.train_files, cfg.on_bad_record = path, "skip"
  it = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1,
                                    include_index=True)
  assert it.num_examples == 4 and it.counts.skipped == {"too_long": 2}
  assert sorted(np.concatenate([b["index"] for b in it]).tolist()) == [0, 1, 3, 5]

  cfg.on_bad_record, cfg.truncate = "error", True
  it = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
  counts = it.counts.as_dict()
  assert it.num_examples == 6 and counts["skipped_total"] == 0
  assert (counts["truncated_prompts"], counts["truncated_responses"]) == (1, 1)


def test_hh_over_long_names_chosen(tmp_path, cache, tok):
  pair = {"chosen": "\n\nHuman: hi\n\nAssistant: yes", "rejected": "\n\nHuman: hi\n\nAssistant: no"}
  long = {"chosen": "\n\nHuman: " + "tell me " * 30 + "\n\nAssistant: yes",
          "rejected": "\n\nHuman: " + "tell me " * 30 + "\n\nAssistant: no"}
  path = write_lines(tmp_path / "hh.jsonl", [pair, long])
  cfg = config(cache, format="hh", train_files=path, prompt_len=12, response_len=8, batch_size=1)
  with pytest.raises(DataError, match=rf"{path}:2: chosen: the dialogue before the last "
                                      r"Assistant turn is \d+ tokens"):
    pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)


def test_skip_counts_combine_build_and_length(tmp_path, cache, tok):
  text = write_lines(tmp_path / "t.jsonl", [{"text": "short"}, {"text": ""}, "{x",
                                            {"text": "far too long " * 20}, {"text": "ok"}])
  cfg = config(cache, format="text", train_files=text, text_len=8, batch_size=1,
               on_bad_record="skip")
  it = pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
  assert it.counts.as_dict() == {
      "skipped": {"broken_json": 1, "empty_text": 1, "too_long": 1}, "skipped_total": 3,
      "truncated_prompts": 0, "truncated_responses": 0, "truncated_texts": 0,
      "shortened_posts": 0}
  assert it.num_examples == 2 and len(collect(it)) == 2


def test_small_fixture_sharding_with_uneven_epochs(tmp_path, cache, tok):
  """21 examples, 2 processes, global batch 4: epoch 0 is positions 0..20 of the stream."""
  path = write_lines(tmp_path / "t.jsonl", [{"text": f"doc {i}"} for i in range(21)])
  cfg = config(cache, format="text", train_files=path, text_len=8, batch_size=4, num_epochs=2)
  streams = []
  for p in range(2):
    it = pipeline.make_train_iterator(cfg, tok, seed=1, process_index=p, process_count=2,
                                      include_index=True)
    streams.append(np.concatenate([b["index"] for b in it]))
    assert it.num_batches == 10  # 42 // 4, the same on both processes
  # Stream position g belongs to process g % 2, at its slot g // 2.
  epoch0 = [streams[g % 2][g // 2] for g in range(21)]
  assert sorted(epoch0) == list(range(21))
  epoch1 = [streams[g % 2][g // 2] for g in range(21, 40)]
  assert len(set(epoch1)) == 19 and epoch1 != epoch0[:19]  # reshuffled


def test_config_errors(tmp_path, cache, tok):
  path = write_lines(tmp_path / "t.jsonl", [{"text": "a"}] * 3)
  cfg = config(cache, format="text", train_files=path, batch_size=3)
  with pytest.raises(ConfigError, match="data.batch_size: 3 must be a positive multiple of the "
                                        "process count 2"):
    pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=2)
  cfg.batch_size = 4
  with pytest.raises(ConfigError, match="data.batch_size: 4 is more than the 3 examples"):
    pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
  cfg.batch_size, cfg.num_epochs = 2, -1
  with pytest.raises(ConfigError, match="data.num_epochs: -1 must be >= 0"):
    pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
  cfg.num_epochs = 0  # forever
  assert pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1).num_batches is None
  cfg.format = "pairs"
  with pytest.raises(ConfigError, match="data.format: must be one of"):
    pipeline.make_train_iterator(cfg, tok, process_index=0, process_count=1)
  cfg.format, cfg.eval_files = "text", ""
  with pytest.raises(ConfigError, match="data.eval_files: no files given"):
    pipeline.make_eval_iterator(cfg, tok, process_index=0, process_count=1)


def test_read_examples_without_tfds(tmp_path, cache):
  path = write_lines(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": ""}, {"prompt": "b"}])
  cfg = config(cache, format="prompts", train_files=path, on_bad_record="skip")
  counter = formats.BadRecordCounter()
  assert [ex.prompt for ex in pipeline.read_examples(cfg, counter=counter)] == ["a", "b"]
  assert counter.skipped == {"empty_text": 1}
