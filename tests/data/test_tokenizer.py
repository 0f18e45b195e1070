"""Tokenizer: in-memory training, save/load, special ids, padding helpers."""
import numpy as np
import pytest

from rlhf_jax.data import formats
from rlhf_jax.data.tokenizer import Tokenizer, left_pad, right_pad


@pytest.fixture(scope="module")
def tok(shared_data):
  examples = formats.read_examples(str(shared_data / "hh-rlhf/harmless-base-test.jsonl.gz"), "hh")
  texts = [t for _, t in zip(range(600), formats.example_texts(examples))]
  return Tokenizer.train(texts, vocab_size=700)


def test_special_ids(tok):
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.pad_id != tok.eos_id
  assert tok.vocab_size == 700


def test_roundtrip_keeps_newlines_and_any_character(tok):
  text = "\n\nHuman: héllo — naïve 中文 🙂\ttab  two spaces\n\nAssistant:"
  ids = tok.encode(text)
  assert tok.unk_id not in ids  # byte fallback: nothing is unknown
  assert tok.decode(ids) == text
  assert tok.decode([tok.pad_id] * 3 + ids + [tok.pad_id]) == text  # pads are dropped
  assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_save_load_same_model(tok, tmp_path):
  path = str(tmp_path / "t.model")
  tok.save(path)
  again = Tokenizer.load(path)
  assert again.fingerprint == tok.fingerprint
  assert again.encode("Assistant: sure thing") == tok.encode("Assistant: sure thing")


def test_left_pad_keeps_end():
  tokens, mask, cut = left_pad([[5, 6, 7], [8], [], [1, 2, 3, 4, 5, 6]], 4)
  np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0], [3, 4, 5, 6]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(cut, [False, False, False, True])
  assert tokens.dtype == mask.dtype == np.int32


def test_right_pad_appends_eos_even_when_cut():
  tokens, mask, cut = right_pad([[5, 6], [], [1, 2, 3, 4, 5]], 4, pad_id=0, eos_id=3)
  np.testing.assert_array_equal(tokens, [[5, 6, 3, 0], [3, 0, 0, 0], [1, 2, 3, 3]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(cut, [False, False, True])
  tokens, mask, cut = right_pad([[5, 6], [1, 2, 3, 4, 5]], 4)  # no EOS: plain text
  np.testing.assert_array_equal(tokens, [[5, 6, 0, 0], [1, 2, 3, 4]])
  np.testing.assert_array_equal(cut, [False, True])


def test_tokenizer_pad_methods(tok):
  ids = tok.encode_batch(["Hi there", "a much longer sentence than the other one"])
  tokens, mask, _ = tok.pad_prompts(ids, 6)
  assert tokens[0, -len(ids[0]):].tolist() == ids[0] and mask[0].sum() == len(ids[0])
  tokens, mask, _ = tok.pad_responses(ids, 64)
  assert tokens[0, :len(ids[0]) + 1].tolist() == ids[0] + [tok.eos_id]
