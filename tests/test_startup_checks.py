"""Start-up checks that stop a run before it wastes work or mixes configurations.

Each reproduces a failure a user met: a misspelt macro on the command line became a new macro;
a missing MODEL_DIR failed with a TypeError after data preparation; resuming with another batch
size replayed or skipped examples; evaluating a model config whose shapes happen to match (more
heads of half the size) loaded silently; a tokenizer larger than the model's vocabulary trained
on NaN losses.
"""
import os
import subprocess
import sys

import gin
import pytest

from pixelllm_jax import cli, gin_checks
from pixelllm_jax.data import tokenizer as tokenizer_lib
from pixelllm_jax.train import run_record, trainer
from test_train_step import ToyIterator, ToyModel, partitioner_of, toy_optimizer

REPO = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_a_misspelt_macro_on_the_command_line_is_an_error(clean_gin):
  with pytest.raises(ValueError, match="TRAIN_STEP: no config file defines or uses the macro "
                     "TRAIN_STEP; did you mean TRAIN_STEPS"):
    cli.parse_gin(["runs/demo.gin"], ["MODEL_DIR = '/tmp/x'", "TRAIN_STEP = 30"])
  gin.clear_config()
  cli.parse_gin(["runs/demo.gin"], ["MODEL_DIR = '/tmp/x'", "TRAIN_STEPS = 30"])
  assert gin.query_parameter("TRAIN_STEPS/gin.macro.value") == 30


def test_required_values_an_entry_point_would_receive(clean_gin):
  cli.parse_gin(["runs/demo.gin"], [])
  assert gin_checks.missing_required("train") == ["MODEL_DIR"]
  gin.clear_config()
  cli.parse_gin(["runs/refcoco_t5_xl.gin"], ["MODEL_DIR = '/tmp/x'"])
  assert gin_checks.missing_required("train") == ["DATA_DIR", "INIT_CHECKPOINT", "SPM_PATH"]
  # Evaluation never reads the init checkpoint.
  assert gin_checks.missing_required("evaluate") == ["DATA_DIR", "SPM_PATH"]


def test_missing_model_dir_stops_the_command_before_any_work(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "pixelllm_jax.train", "--gin_file=runs/demo.gin",
                         f"--gin.WORLD_DIR='{tmp_path / 'world'}'"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "train needs values the config leaves %gin.REQUIRED: MODEL_DIR" in proc.stderr
  assert not (tmp_path / "world").exists()  # nothing prepared


def test_the_run_record_holds_what_changes_results(clean_gin):
  cli.parse_gin(["runs/demo.gin"], ["MODEL_DIR = '/tmp/a'"])
  base = gin_checks.run_record()
  assert base["train_data.batch_size"] == "16"          # the macro resolved
  assert base["T5Config.num_heads"] == "4"
  assert base["make_optimizer.total_steps"] == "3000"
  assert not any(k.startswith(("Partitioner.", "train.model_dir", "train.log_every",
                               "evaluate.", "DataConfig.manual_dir")) for k in base)
  assert "T5Config.num_heads" in gin_checks.model_keys(base)
  assert "train_data.batch_size" not in gin_checks.model_keys(base)
  gin.clear_config()
  cli.parse_gin(["runs/demo.gin"], ["MODEL_DIR = '/tmp/b'", "BATCH_SIZE = 8",
                                    "Partitioner.mesh_shape = (2, 2, 2)", "train.log_every = 1"])
  changed = gin_checks.run_record()
  assert run_record.differences(base, changed) == ["train_data.batch_size: 16 -> 8"]


def _train(model_dir, num_steps, record, allow=False):
  return trainer.train(model_dir=str(model_dir), model=ToyModel(), train_data=ToyIterator(),
                       num_steps=num_steps, optimizer=toy_optimizer(),
                       partitioner=partitioner_of(2, 1), checkpoint_every=2,
                       run_record=record, allow_config_change=allow)


def test_resuming_with_a_changed_batch_size_stops_unless_intended(tmp_path):
  record = {"train_data.batch_size": "16", "T5Config.num_heads": "4"}
  _train(tmp_path, 2, record)
  assert run_record.load(str(tmp_path))["record"] == record
  changed = {**record, "train_data.batch_size": "8"}
  with pytest.raises(run_record.RunConfigChanged, match=r"train_data.batch_size: 16 -> 8"):
    _train(tmp_path, 4, changed)
  # Another mesh and the same record: resumes.
  result = trainer.train(model_dir=str(tmp_path), model=ToyModel(), train_data=ToyIterator(),
                         num_steps=3, optimizer=toy_optimizer(), partitioner=partitioner_of(1, 2),
                         checkpoint_every=2, run_record=record)
  assert int(result.state.step) == 3
  result = _train(tmp_path, 4, changed, allow=True)
  assert int(result.state.step) == 4
  stored = run_record.load(str(tmp_path))
  assert stored["record"] == changed and stored["history"] == [record]


def test_evaluating_with_other_heads_of_the_same_shapes_stops(tmp_path):
  run_record.save(str(tmp_path), {"T5Config.num_heads": "4", "T5Config.d_kv": "16",
                                  "train_data.batch_size": "16"})
  current = {"T5Config.num_heads": "8", "T5Config.d_kv": "8"}
  with pytest.raises(run_record.RunConfigChanged) as err:
    run_record.check(str(tmp_path), current, what="evaluating", allow=False, keys=current)
  assert "T5Config.d_kv: 16 -> 8" in str(err.value)
  assert "T5Config.num_heads: 4 -> 8" in str(err.value)
  assert "batch_size" not in str(err.value)  # only the model's keys are compared
  assert run_record.check(str(tmp_path), current, what="evaluating", allow=True, keys=current)


def test_a_tokenizer_larger_than_the_vocabulary_stops_at_start_up(clean_gin, tmp_path):
  texts = ["a red circle on the left", "where is the blue square", "describe in detail"] * 20
  (tmp_path / "spiece.model").write_bytes(tokenizer_lib.train_sentencepiece(texts, 64))
  pieces = tokenizer_lib.Tokenizer.from_file(str(tmp_path / "spiece.model"), 0).num_pieces
  cli.parse_gin(["runs/demo.gin"], [f"WORLD_DIR = '{tmp_path}'", "MODEL_DIR = '/tmp/x'"])
  record = cli.startup_record("train", "train_data.data")
  assert record["tokenizer.vocab_size"] == str(pieces) and len(record["tokenizer.sha256"]) == 64
  gin.clear_config()
  cli.parse_gin(["runs/demo.gin"], [f"WORLD_DIR = '{tmp_path}'", "MODEL_DIR = '/tmp/x'",
                                    "DataConfig.extra_ids = 300"])
  with pytest.raises(ValueError, match=rf"spiece.model has {pieces + 300} ids .* vocabulary "
                     "holds 256"):
    cli.startup_record("train", "train_data.data")


def test_a_resumed_run_keeps_the_earlier_operative_config(tmp_path, monkeypatch):
  """config.gin used to be overwritten on resume: the first run's config was lost."""
  for text in ("first = 1\n", "first = 1\n", "second = 2\n", "third = 3\n"):
    monkeypatch.setattr(gin, "operative_config_str", lambda text=text: text)
    cli.write_operative_config(str(tmp_path))
  assert (tmp_path / "config.gin").read_text() == "third = 3\n"
  assert (tmp_path / "config.1.gin").read_text() == "first = 1\n"  # an unchanged resume adds none
  assert (tmp_path / "config.2.gin").read_text() == "second = 2\n"
  assert not (tmp_path / "config.3.gin").exists()


def test_a_macro_defined_and_used_on_the_command_line_is_accepted(clean_gin):
  cli.parse_gin(["runs/demo.gin"], ["MODEL_DIR = '/tmp/x'", "MY_LR = 0.003",
                                    "make_optimizer.learning_rate = %MY_LR"])
  assert gin.query_parameter("MY_LR/gin.macro.value") == 0.003
  assert gin.query_parameter("make_optimizer.learning_rate").scoped_selector == "MY_LR/gin.macro"
