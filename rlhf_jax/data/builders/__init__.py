"""TFDS builders (array_record, no TensorFlow) for the record formats."""
from rlhf_jax.data.builders.jsonl import BUILDERS, Prepared, decode, prepare

__all__ = ["BUILDERS", "Prepared", "decode", "prepare"]
