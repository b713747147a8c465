"""The paper-scale configs have the published sizes; the T5 tokenizer gives the 32128-wide logits.

Each model gin (gin_configs/models/pixelllm_t5_{xl,base}.gin) is parsed and the composer is
initialized abstractly (`jax.eval_shape` of `model.init` on a ShapeDtypeStruct batch at 384 px,
B=1, K=1, N=1, L=8, Lc=8: nothing is allocated). Parameters are counted per tower (the composer's
top-level submodules), LoRA (leaves named lora_a / lora_b) apart, and those the model trains
(`PixelLLMConfig.frozen`: SAM, the prompt encoder and the T5 base frozen). Published sizes
(docs/DESIGN.md, "The model") are checked at the stated tolerances, and each tower's exact count
against its closed-form arithmetic, so a drift of even one layer norm shows.

Measured (T5-XL config): EVA02-L 303,268,800; SAM ViT-H encoder 637,026,048; prompt encoder 1,792;
extractor 43,505,408; visual_proj 2,103,296; Flan-T5-XL 2,849,757,184 + LoRA 18,874,368; loc head
1,580,548; total 3,856,117,444; trainable 369,332,420.

Known, deliberate differences from the official breakdown (not tolerance slack):
- extractor 43.51 M vs 44.0 M: the official prompt adapter also holds the dense branch's
  Dense 512 -> 1024 (525,312 params), which PixelLLM computes and never uses
  (`prompt_fuse_fn='sparse'`); prompt_extractor.py drops it. With it the count is 44.03 M.
- prompt encoder 1,792 vs ~6 K: SAM's mask-prompt convs (`mask_downscaling`, 4,684 params) are
  not implemented (PixelLLM never feeds mask prompts).
- SAM ViT-H: 637.0 M is the encoder with its 64 x 64 pos-embed and rel-pos tables; the "632 M"
  often quoted leaves part of that out.
"""
import copy

import gin
import jax
import numpy as np
import pytest

from pixelllm_jax import cli, configurables
from pixelllm_jax.convert import assemble
from pixelllm_jax.data.tokenizer import Tokenizer
from pixelllm_jax.lora import LORA_PARAM_NAMES
from pixelllm_jax.tree_paths import path_of

TOWERS = ("eva02", "sam", "prompt_encoder", "extractor", "visual_proj", "t5", "loc_head")


def _n(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _parse(files, bindings=()):
  gin.clear_config()
  gin.add_config_file_search_path(cli.DEFAULT_GIN_SEARCH_PATH)
  gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=False)


def _counts(gin_file: str) -> dict:
  _parse([gin_file])
  try:
    model = configurables.REGISTERED["PixelLLMModel"][1]()
    params = assemble.abstract_params(model)  # eval_shape at B=1, K=1, N=1, L=8, Lc=8
  finally:
    gin.clear_config()
  leaves = [(path_of(kp), x) for kp, x in jax.tree_util.tree_leaves_with_path(params)]
  lora = [x for p, x in leaves if p[-1] in LORA_PARAM_NAMES]
  counts = {name: _n(params[name]) for name in params}
  counts.update(
      lora=_n(lora), t5_base=counts["t5"] - _n(lora), total=_n(params),
      trainable=_n([x for p, x in leaves if model.trainable(p)]), config=model.config)
  return counts


@pytest.fixture(scope="module")
def xl():
  return _counts("models/pixelllm_t5_xl.gin")


@pytest.fixture(scope="module")
def base():
  return _counts("models/pixelllm_t5_base.gin")


def _within(value: float, published: float, rel: float) -> bool:
  return abs(value - published) <= rel * published


# ---- closed forms (each tower's parameter arithmetic) -------------------------------------------


def _t5_base_count(d, heads, d_kv, d_ff, enc, dec, vocab=32128, buckets=32) -> int:
  """Flan-T5 (v1.1): untied embedding + logits, gated-GELU, RMSNorm scales, a bias table a stack."""
  attn = 4 * d * heads * d_kv
  mlp = 3 * d * d_ff
  return (2 * vocab * d + enc * (attn + mlp + 2 * d) + dec * (2 * attn + mlp + 3 * d)
          + 2 * (buckets * heads + d))


def _lora_count(d, heads, d_kv, rank, enc, dec) -> int:
  per = rank * (d + heads * d_kv)          # lora_a [d, r] + lora_b [r, h*dk]
  return per * (2 * enc + 4 * dec)         # q, v: encoder self; decoder self + cross


def _sam_h_count() -> int:
  w, mlp, depth, patch, grid, out, head_dim = 1280, 5120, 32, 16, 64, 256, 80
  block = 2 * 2 * w + (w * 3 * w + 3 * w) + (w * w + w) + (w * mlp + mlp + mlp * w + w)
  rel_windowed = 2 * (2 * 14 - 1) * head_dim
  rel_global = 2 * (2 * grid - 1) * head_dim
  neck = w * out + 2 * out + 9 * out * out + 2 * out
  return (depth * block + 28 * rel_windowed + 4 * rel_global + patch * patch * 3 * w + w
          + grid * grid * w + neck)


def _eva02_l_count() -> int:
  w, mlp, depth, patch, grid = 1024, 2730, 24, 14, 16
  attn = 3 * w * w + 2 * w + (w * w + w)   # q/k/v kernels, q and v biases, proj
  swiglu = 2 * (w * mlp + mlp) + 2 * mlp + (mlp * w + w)
  block = 2 * 2 * w + attn + swiglu
  return depth * block + patch * patch * 3 * w + w + w + (grid * grid + 1) * w + 2 * w


# ---- T5-XL (the paper model) -----------------------------------------------------------------


def test_towers_are_the_composer_submodules(xl, base):
  for counts in (xl, base):
    assert set(TOWERS) <= set(counts)
    assert sum(counts[t] for t in TOWERS) == counts["total"]


def test_eva02_l(xl):
  assert xl["eva02"] == _eva02_l_count() == 303_268_800
  assert _within(xl["eva02"], 303.3e6, 0.01)


def test_sam_vit_h_encoder(xl):
  assert xl["sam"] == _sam_h_count() == 637_026_048
  assert 632e6 <= xl["sam"] <= 637.05e6  # "632-637 M" quoted; 637.0 M with pos-embed and rel-pos


def test_flan_t5_xl_base_without_lora(xl):
  assert xl["t5_base"] == _t5_base_count(2048, 32, 64, 5120, 24, 24) == 2_849_757_184
  assert _within(xl["t5_base"], 2.85e9, 0.01)


def test_lora_rank_32_on_q_v(xl):
  assert xl["lora"] == _lora_count(2048, 32, 64, 32, 24, 24) == 18_874_368
  assert _within(xl["lora"], 18.9e6, 0.01)


def test_prompt_feature_extractor(xl):
  assert _within(xl["extractor"], 44.0e6, 0.02)
  # The official dense-branch Dense 512 -> 1024, dropped here (module docstring), closes the gap.
  assert _within(xl["extractor"] + 512 * 1024 + 1024, 44.0e6, 0.001)


def test_small_towers(xl):
  assert xl["prompt_encoder"] == 2 * 128 + 4 * 256 + 256 + 256  # Fourier matrix, point types,
  #                                                                not-a-point, no-mask
  assert xl["visual_proj"] == 1024 * 2048 + 2048 + 2 * 2048 == 2_103_296  # ~2.1 M
  assert _within(xl["loc_head"], 1.58e6, 0.01)


def test_trainable_under_paper_lora(xl):
  expected = xl["eva02"] + xl["extractor"] + xl["visual_proj"] + xl["loc_head"] + xl["lora"]
  assert xl["trainable"] == expected == 369_332_420
  assert _within(xl["trainable"], 370e6, 0.03)


def test_total(xl):
  assert _within(xl["total"], 3.86e9, 0.01)  # "about 3.9 B" (docs/DESIGN.md); 3.86 B counted


def test_paper_layout(xl):
  cfg = xl["config"]
  assert cfg.t5.lora.rank == 32 and cfg.t5.lora.scale == 2.0
  assert cfg.t5.lora.encoder_self == cfg.t5.lora.decoder_self == cfg.t5.lora.decoder_cross == (
      "q", "v")
  assert cfg.t5.feed_forward == "gated-gelu" and not cfg.t5.tie_word_embeddings
  assert cfg.t5.vocab_size == 32128
  assert cfg.eva02.image_size == cfg.sam.image_size == 384
  assert cfg.prompt_encoder.input_image_size == (384, 384)
  assert cfg.sam.global_blocks == (7, 15, 23, 31) and cfg.sam.window_size == 14
  assert cfg.loc_head.points_per_token == 2 and cfg.loc_head.hidden_dim == 512
  assert cfg.eva02.remat == cfg.sam.remat == cfg.t5.remat == "block"
  assert cfg.frozen == ("sam", "prompt_encoder", "t5")


# ---- T5-base variant ---------------------------------------------------------------------------


def test_t5_base_variant_builds(base, xl):
  assert base["t5_base"] == _t5_base_count(768, 12, 64, 2048, 12, 12) == 247_577_856
  assert base["lora"] == _lora_count(768, 12, 64, 32, 12, 12) == 3_538_944
  for tower in ("eva02", "sam", "prompt_encoder", "extractor"):
    assert base[tower] == xl[tower]
  assert base["visual_proj"] == 1024 * 768 + 768 + 2 * 768
  print({k: v for k, v in base.items() if k != "config"})


# ---- the run config ----------------------------------------------------------------------------


def test_refcoco_run_config(xl):
  _parse(["runs/refcoco_t5_xl.gin"], ["MODEL_DIR = '/tmp/never'"])
  try:
    q = lambda name: copy.deepcopy(gin.query_parameter(name))  # noqa: E731  (resolves macros)
    assert q("train_data.batch_size") == 64 and q("train.num_steps") == 120_000
    assert q("make_optimizer.learning_rate") == 5e-5 and q("make_optimizer.warmup_steps") == 1000
    assert q("make_optimizer.total_steps") == 120_000
    assert gin.query_parameter("train.init_checkpoint").scoped_selector == (
        "INIT_CHECKPOINT/gin.macro")
    assert dict(q("DataConfig.builder_configs")) == {"refer": "refcoco_unc"}
    assert q("train_data.mixture") == (("refer", 1.0),)
    assert q("DataConfig.extra_ids") == 100
    assert q("train_data.canvas_size") == q("evaluate.canvas_size") == 384
    assert tuple(q("Partitioner.mesh_shape")) == (1, -1, 1) and q("Partitioner.rules") == "fsdp"
  finally:
    gin.clear_config()


@pytest.mark.parametrize("run", ["trace_t5_xl", "refcoco_t5_xl", "refer_mixture_t5_xl",
                                 "refseg_t5_xl", "vg_loca_t5_xl", "densecap_t5_xl", "joint_t5_xl"])
def test_paper_runs_train_and_evaluate_fsdp_over_every_device(run):
  # The templates' `dp` default replicates 3.9 B parameters per chip, which no v5e chip holds
  # (README, "Scale"); every paper run file must end on the FSDP layout.
  _parse([f"runs/{run}.gin"], ["MODEL_DIR = '/tmp/never'"])
  try:
    partitioner = configurables.REGISTERED["Partitioner"][1](devices=jax.devices()[:8])
    assert partitioner.rule_set == "fsdp" and dict(partitioner.mesh.shape) == {
        "data": 1, "fsdp": 8, "model": 1}
  finally:
    gin.clear_config()


def test_refer_mixture_run_is_the_refcoco_run_on_the_refcoco_union():
  _parse(["runs/refer_mixture_t5_xl.gin"], ["MODEL_DIR = '/tmp/never'"])
  try:
    q = lambda name: copy.deepcopy(gin.query_parameter(name))  # noqa: E731
    assert dict(q("DataConfig.builder_configs")) == {"refer": "refcoco_mixed"}
    assert q("train_data.mixture") == (("refer", 1.0),) and q("train.num_steps") == 120_000
    assert q("make_optimizer.learning_rate") == 5e-5
  finally:
    gin.clear_config()


def test_refseg_run_trains_the_loc_head_and_the_mask_adapter_only():
  _parse(["runs/refseg_t5_xl.gin"], ["MODEL_DIR = '/tmp/never'"])
  try:
    model = configurables.REGISTERED["PixelLLMModel"][1]()
    q = lambda name: copy.deepcopy(gin.query_parameter(name))  # noqa: E731
    assert dict(q("make_optimizer.lr_multipliers")) == {"mask_adapter": 10.0}
    assert q("train.num_steps") == 60_000 and q("make_optimizer.warmup_steps") == 500
    assert q("train_data.mixture") == (("refseg", 1.0),)
    params = assemble.abstract_params(model)
  finally:
    gin.clear_config()
  leaves = [(path_of(kp), x) for kp, x in jax.tree_util.tree_leaves_with_path(params)]
  trains = {p[0] for p, _ in leaves if model.trainable(p)}
  assert trains == {"loc_head", "mask_adapter"}
  assert any(p[-1] in LORA_PARAM_NAMES for p, _ in leaves)   # present, frozen
  # The paper's mask branch: SAM's decoder at width 256 (about 4.1 M) and the adapter.
  decoder = sum(int(np.prod(x.shape)) for p, x in leaves if p[0] == "mask_decoder")
  assert 3.9e6 < decoder < 4.3e6, decoder



def test_densecap_run_trains_the_box_decoder_at_the_paper_size():
  _parse(["runs/densecap_t5_xl.gin"], ["MODEL_DIR = '/tmp/never'"])
  try:
    model = configurables.REGISTERED["PixelLLMModel"][1]()
    q = lambda name: copy.deepcopy(gin.query_parameter(name))  # noqa: E731
    assert q("train_data.mixture") == (("densecap", 1.0),)
    assert q("train.num_steps") == 40_000 and q("make_optimizer.layer_decay") == 0.8
    assert q("TaskConfig.max_detection_boxes") == 100
    assert set(q("evaluate.splits")) == {"densecap", "loca", "refer_loca"}
    params = assemble.abstract_params(model)
  finally:
    gin.clear_config()
  head = model.config.box_head
  assert (head.nms_iou, head.max_detections, head.fg_iou, head.roi_size) == (0.5, 100, 0.6, 7)
  leaves = [(path_of(kp), x) for kp, x in jax.tree_util.tree_leaves_with_path(params)]
  assert {p[0] for p, _ in leaves if model.trainable(p)} >= {"box_head", "eva02"}
  assert "sam" not in {p[0] for p, _ in leaves if model.trainable(p)}
  # The official box decoder is about 25 M parameters (pyramid ~5.7 M, CenterNet head ~5 M,
  # ROI fully connected layers ~14 M: a rough count, so a wide band).
  size = sum(int(np.prod(x.shape)) for p, x in leaves if p[0] == "box_head")
  assert 20e6 < size < 28e6, size

# ---- tokenizer: a T5-style sentencepiece model gives the 32128-wide logit layer ----------------


def _t5_style_model(num_pieces: int = 32000) -> tuple[bytes, list[str]]:
  """A unigram sentencepiece model with T5's ids (pad 0, eos 1, unk 2) and `num_pieces` pieces."""
  from sentencepiece import sentencepiece_model_pb2 as pb  # pylint: disable=import-outside-toplevel
  m = pb.ModelProto()
  kinds = pb.ModelProto.SentencePiece
  for piece, kind in (("<pad>", kinds.CONTROL), ("</s>", kinds.CONTROL), ("<unk>", kinds.UNKNOWN)):
    m.pieces.add(piece=piece, score=0.0, type=kind)
  words = ["▁red", "▁ball", "▁on", "▁the", "▁table", "▁left", "▁of", "▁a", "▁dog"]
  letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["▁"]
  fillers = [f"▁w{i}" for i in range(num_pieces - 3 - len(words) - len(letters))]
  for i, piece in enumerate(words + letters + fillers):
    score = -1.0 if piece in words else (-5.0 if piece in letters else -10.0 - i * 1e-4)
    m.pieces.add(piece=piece, score=score, type=kinds.NORMAL)
  t = m.trainer_spec
  t.model_type = pb.TrainerSpec.UNIGRAM
  t.vocab_size = num_pieces
  t.pad_id, t.eos_id, t.unk_id, t.bos_id = 0, 1, 2, -1
  t.pad_piece, t.eos_piece, t.unk_piece = "<pad>", "</s>", "<unk>"
  n = m.normalizer_spec
  n.name = "identity"
  n.add_dummy_prefix = True
  n.remove_extra_whitespaces = True
  n.escape_whitespaces = True
  return m.SerializeToString(), words


def test_t5_sentencepiece_with_32000_pieces_gives_32128_logits(tmp_path, xl):
  proto, words = _t5_style_model()
  path = tmp_path / "spiece.model"
  path.write_bytes(proto)
  tok = Tokenizer.from_file(str(path))  # extra_ids=100, as T5 / seqio
  assert tok.num_pieces == 32000
  assert tok.vocab_size == 32100 and tok.logits_size == 32128
  assert tok.logits_size == xl["config"].t5.vocab_size  # the paper gin's logit width
  assert tok.piece(32099) == "<extra_id_0>" and tok.piece(32000) == "<extra_id_99>"
  assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
  text = "red ball on the left of a dog"
  ids = tok.encode(text)
  assert ids == [3 + words.index("▁" + w) for w in text.split()]  # whole-word pieces
  assert tok.decode(ids + [1, 5, 6]) == text                      # stops at EOS
  assert tok.decode(ids + [0, 32005]) == text                     # pad and extra ids dropped
  assert tok.decode(tok.encode("bad dog")) == "bad dog"           # letters for unknown words
