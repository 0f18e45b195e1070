"""A Hugging Face `tokenizer.json` behind the interface of data/tokenizer.Tokenizer.

Pretrained checkpoints (GPT-2, Pythia, Llama) come with a `tokenizers` JSON file
rather than a sentencepiece model. `HFTokenizer.load(path)` takes that file, or the
checkpoint directory holding it, and offers the same encode / encode_batch / decode /
pad_prompts / pad_responses / pad_id / eos_id as the sentencepiece Tokenizer, so the
data pipeline does not care which one it holds.

Special tokens: `eos_token` / `pad_token` arguments win; otherwise they come from
the directory's tokenizer_config.json or special_tokens_map.json; otherwise from a
few well-known names. Padding must differ from EOS (the reward model reads its score
at EOS), so a tokenizer with no pad token (GPT-2, Llama) needs `pad_token` or
`pad_id` chosen by the user: a rarely used token, or one added to the vocabulary
(and the model's embedding). Encoding adds no special tokens, as in the sentencepiece
Tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional, Sequence

from rlhf_jax.data.tokenizer import left_pad, right_pad

TOKENIZER_FILE = "tokenizer.json"
_EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")
_PAD_NAMES = ("<pad>", "<|padding|>", "[PAD]", "<|pad|>", "<|finetune_right_pad_id|>")
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
_UNK_NAMES = ("<unk>", "[UNK]")


def _token_text(value) -> Optional[str]:
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


class HFTokenizer:
  """A `tokenizers.Tokenizer` with the sentencepiece Tokenizer's interface."""

  def __init__(self, tokenizer_json: str | bytes, *, eos_token: Optional[str] = None,
               pad_token: Optional[str] = None, bos_token: Optional[str] = None,
               unk_token: Optional[str] = None, pad_id: Optional[int] = None,
               special_tokens: Optional[dict] = None):
    from tokenizers import Tokenizer as _Tok  # pylint: disable=import-outside-toplevel
    self._json = tokenizer_json.decode() if isinstance(tokenizer_json, bytes) else tokenizer_json
    self._tok = _Tok.from_str(self._json)
    named = dict(special_tokens or {})
    self._options = dict(eos_token=eos_token, pad_token=pad_token, bos_token=bos_token,
                         unk_token=unk_token, pad_id=pad_id, special_tokens=named)

    def find(explicit, key, candidates):
      for text in (explicit, _token_text(named.get(key))):
        if text is not None:
          token_id = self._tok.token_to_id(text)
          if token_id is None:
            raise ValueError(f"{key} {text!r} is not in the tokenizer's vocabulary")
          return token_id
      for text in candidates:
        token_id = self._tok.token_to_id(text)
        if token_id is not None:
          return token_id
      return None

    self._eos = find(eos_token, "eos_token", _EOS_NAMES)
    self._bos = find(bos_token, "bos_token", _BOS_NAMES)
    self._unk = find(unk_token, "unk_token", _UNK_NAMES)
    self._pad = pad_id if pad_id is not None else find(pad_token, "pad_token", _PAD_NAMES)
    if self._eos is None:
      raise ValueError("tokenizer has no EOS token: pass eos_token=")
    if self._pad is None or self._pad == self._eos:
      raise ValueError(
          "tokenizer needs a pad id distinct from EOS (it has "
          f"{'none' if self._pad is None else 'pad == eos'}): pass pad_token= or pad_id=")

  @classmethod
  def load(cls, path: str, **kwargs) -> "HFTokenizer":
    """From a tokenizer.json file or a directory holding one (and its special tokens)."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
    special: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
      candidate = os.path.join(directory, name)
      if directory and os.path.exists(candidate):
        with open(candidate) as f:
          data = json.load(f)
        special.update({k: v for k, v in data.items()
                        if k in ("eos_token", "pad_token", "bos_token", "unk_token")
                        and _token_text(v) is not None})
    with open(file) as f:
      return cls(f.read(), special_tokens=special, **kwargs)

  def save(self, path: str) -> None:
    """Writes the tokenizer.json (atomically)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      f.write(self._json)
    os.replace(tmp, path)

  @property
  def fingerprint(self) -> str:
    extra = json.dumps([self._eos, self._pad], sort_keys=True)
    return hashlib.sha256((self._json + extra).encode()).hexdigest()[:16]

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  pad_id = property(lambda self: self._pad)
  eos_id = property(lambda self: self._eos)
  bos_id = property(lambda self: -1 if self._bos is None else self._bos)
  unk_id = property(lambda self: -1 if self._unk is None else self._unk)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, no BOS/EOS added."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    if not len(texts):
      return []
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; pad ids are dropped, nothing stops at EOS."""
    pad = self.pad_id
    return self._tok.decode([int(i) for i in ids if int(i) != pad],
                            skip_special_tokens=False)

  def pad_prompts(self, seqs: Sequence[Sequence[int]], length: int):
    """Left-pad / keep-the-end truncate; returns (tokens, mask, truncated)."""
    return left_pad(seqs, length, self.pad_id)

  def pad_responses(self, seqs: Sequence[Sequence[int]], length: int):
    """Append EOS, right-pad / truncate; returns (tokens, mask, truncated)."""
    return right_pad(seqs, length, self.pad_id, eos_id=self.eos_id)

  def __getstate__(self):
    return {"json": self._json, "options": self._options}

  def __setstate__(self, state):
    self.__init__(state["json"], **state["options"])


def load_tokenizer(path: str, **kwargs):
  """A sentencepiece `.model` or an HF `tokenizer.json` (or a directory with one)."""
  if path.endswith(".model"):
    from rlhf_jax.data.tokenizer import Tokenizer  # pylint: disable=import-outside-toplevel
    return Tokenizer.load(path)
  return HFTokenizer.load(path, **kwargs)
