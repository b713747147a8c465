"""SentencePiece tokenizer with T5 ids, and in-process training for the generated world.

T5 conventions (t5x / seqio `SentencePieceVocabulary`):
- pad 0, eos 1, unk 2, no BOS; the decoder start id is pad (0).
- `extra_ids` sentinel ids (`<extra_id_N>`) are appended after the model's
  pieces: a 32000-piece T5 model with 100 extra ids has `vocab_size` 32100.
- The logit layer is padded to a multiple of 128 (`logits_size`), which is
  where T5's 32128 comes from.
- `decode` stops at the first EOS and drops pad and extra ids.
"""
import io
from typing import Iterable, Sequence

import sentencepiece as spm

from pixelllm_jax.batch import EOS_ID, PAD_ID, UNK_ID

LOGITS_MULTIPLE = 128


def round_up(n: int, multiple: int = LOGITS_MULTIPLE) -> int:
  """Smallest multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


class Tokenizer:
  """A sentencepiece model with T5 special ids."""

  def __init__(self, model_proto: bytes, extra_ids: int = 100):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.extra_ids = extra_ids
    ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
    if ids != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError(f"model has (pad, eos, unk) ids {ids}; T5 needs {(PAD_ID, EOS_ID, UNK_ID)}")

  @classmethod
  def from_file(cls, path: str, extra_ids: int = 100) -> "Tokenizer":
    with open(path, "rb") as f:
      return cls(f.read(), extra_ids)

  @classmethod
  def from_proto(cls, model_proto: bytes, extra_ids: int = 100) -> "Tokenizer":
    return cls(model_proto, extra_ids)

  @property
  def pad_id(self) -> int:
    return PAD_ID

  @property
  def eos_id(self) -> int:
    return EOS_ID

  @property
  def unk_id(self) -> int:
    return UNK_ID

  @property
  def num_pieces(self) -> int:
    """Pieces in the sentencepiece model (specials included)."""
    return self._sp.get_piece_size()

  @property
  def vocab_size(self) -> int:
    """Pieces plus extra ids."""
    return self.num_pieces + self.extra_ids

  @property
  def logits_size(self) -> int:
    """vocab_size rounded up to a multiple of 128: the width of the logit layer."""
    return round_up(self.vocab_size)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, no EOS appended."""
    return list(self._sp.encode(text, out_type=int))

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` up to the first EOS; pad and ids beyond the pieces are dropped."""
    kept = []
    for i in ids:
      i = int(i)
      if i == EOS_ID:
        break
      if i != PAD_ID and 0 <= i < self.num_pieces:
        kept.append(i)
    return self._sp.decode(kept)

  def piece(self, token_id: int) -> str:
    """The piece of one id ("▁red"); "<extra_id_N>" for T5 sentinel ids."""
    if self.num_pieces <= token_id < self.vocab_size:
      return f"<extra_id_{self.vocab_size - 1 - token_id}>"
    return self._sp.id_to_piece(int(token_id))


def train_sentencepiece(sentences: Sequence[str], vocab_size: int, *, model_type: str = "unigram") -> bytes:
  """A serialized sentencepiece model trained in-process on `sentences`.

  Every special id is set explicitly (sentencepiece's defaults are unk 0,
  bos 1, eos 2). Deterministic for the same sentences: one thread, no
  sampling or shuffling of the input, a fixed random seed. The vocabulary
  may come out smaller than `vocab_size` on a small corpus
  (hard_vocab_limit=False).
  """
  spm.set_random_generator_seed(0)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
      pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
      hard_vocab_limit=False,
      character_coverage=1.0,
      num_threads=1,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      minloglevel=2,
  )
  return model.getvalue()
