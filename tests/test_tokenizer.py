"""Tests of the T5-id sentencepiece tokenizer and its in-process training."""
import numpy as np
import pytest

from pixelllm_jax.data import tokenizer as tok_lib
from pixelllm_jax.data.world import generate, language, scene as scene_lib


def _world_text(count: int = 60) -> list[str]:
  texts = []
  for i in range(count):
    rng = np.random.default_rng(i)
    scene = scene_lib.sample_scene(rng, scene_lib.WorldConfig())
    texts += [language.caption(scene), language.narrate(scene, rng).caption]
    texts += [e.text for e in language.referring_expressions(scene, rng)]
    texts += language.region_phrases(scene) + list(generate.INSTRUCTIONS)
  return texts


@pytest.fixture(scope="module")
def world_text():
  return _world_text()


@pytest.fixture(scope="module")
def tokenizer(world_text):
  return tok_lib.Tokenizer.from_proto(tok_lib.train_sentencepiece(world_text, 256, model_type="bpe"))


def test_special_ids(tokenizer):
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2)
  assert [tokenizer.piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
  ids = tokenizer.encode("a red circle")
  assert ids and 1 not in ids and 0 not in ids  # no EOS added, no pad
  assert 2 in tokenizer.encode("a red circle ~")  # unseen character -> unk


def test_round_trip_of_world_text(tokenizer, world_text):
  for text in world_text:
    assert tokenizer.decode(tokenizer.encode(text)) == text
  # Every world word (and comma) is one piece, so a 28-word narrative fits the 40-token target.
  assert all(len(tokenizer.encode(t)) == len(t.replace(",", " ,").split()) for t in world_text)


def test_decode_stops_at_eos_and_drops_pad(tokenizer):
  ids = tokenizer.encode("big blue square")
  assert tokenizer.decode([0] + ids + [0, 0]) == "big blue square"
  assert tokenizer.decode(ids + [1] + tokenizer.encode("red")) == "big blue square"
  assert tokenizer.decode(np.asarray(ids + [tokenizer.vocab_size - 1])) == "big blue square"


def test_vocab_and_logits_sizes(tokenizer):
  assert tokenizer.num_pieces == 256
  assert tokenizer.vocab_size == 256 + 100
  assert tokenizer.logits_size == 384
  assert tokenizer.piece(tokenizer.vocab_size - 1) == "<extra_id_0>"
  assert tok_lib.round_up(32000 + 100) == 32128  # T5: 32000 pieces + 100 extra ids
  assert tok_lib.round_up(256) == 256 and tok_lib.round_up(257) == 384
  no_extra = tok_lib.Tokenizer(tokenizer._sp.serialized_model_proto(), extra_ids=0)
  assert (no_extra.vocab_size, no_extra.logits_size) == (256, 256)


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_training_is_deterministic_with_t5_ids(world_text, model_type):
  a = tok_lib.train_sentencepiece(world_text, 256, model_type=model_type)
  b = tok_lib.train_sentencepiece(world_text, 256, model_type=model_type)
  assert a == b
  t = tok_lib.Tokenizer.from_proto(a)
  assert (t._sp.pad_id(), t._sp.eos_id(), t._sp.unk_id(), t._sp.bos_id()) == (0, 1, 2, -1)


def test_from_file(tokenizer, tmp_path):
  path = tmp_path / "spiece.model"
  path.write_bytes(tokenizer._sp.serialized_model_proto())
  loaded = tok_lib.Tokenizer.from_file(str(path))
  assert loaded.encode("where is the red one") == tokenizer.encode("where is the red one")


def test_rejects_models_without_t5_ids():
  import io
  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f"] * 20), model_writer=model,
                                 vocab_size=12, hard_vocab_limit=False, minloglevel=2)
  with pytest.raises(ValueError, match="T5"):
    tok_lib.Tokenizer.from_proto(model.getvalue())
