"""Generates the grounded world on disk: images, LN / refer / VG files, scenes, spiece.model.

  python -m pixelllm_jax.data.world.generate --out_dir=/tmp/world \\
      --num_train=3000 --num_val=300 --num_test=300 --image_size=64 --seed=0

writes the layout of docs/DATA_FORMATS.md under --out_dir (about 20 s of CPU time for
3000 + 300 + 300 scenes at 64 px on one CPU core).

Determinism: scene i of split s draws from `default_rng([seed, s, i])`
(s = 0, 1, 2 for train, val, test), so a split does not depend on the sizes
of the others, and the same arguments give byte-identical files. Image ids
run 1, 2, ... over train, then val, then test; annotation ids likewise over
all objects.

The sentencepiece model is trained on every generated text (captions,
narratives, expressions, region phrases) plus the task instructions, once per
scene. It is BPE: sentencepiece's unigram trainer on this ~50-word language
stops at ~60 pieces and splits common words into characters, while BPE gives
one piece per world word and keeps sub-word pieces for anything else.
"""
import os
import time

import numpy as np
from absl import app, flags

from pixelllm_jax import tasks
from pixelllm_jax.data import tokenizer
from pixelllm_jax.data.world import language, scene as scene_lib, writers

SPLITS = ("train", "val", "test")
# The tasks' text prompts, so the world tokenizer has whole pieces for them; each once (tasks that
# share a prompt, e.g. refseg and refer, leave the tokenizer as it was).
INSTRUCTIONS = tuple(dict.fromkeys(tasks.get(name).instruction for name in tasks.TASKS))
VOCAB_SIZE = 256


def _annotate(split: str, index: int, image_id: int, first_ann_id: int, seed: int,
              config: scene_lib.WorldConfig) -> tuple[writers.Annotated, np.ndarray]:
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  scene = scene_lib.sample_scene(rng, config)
  image = scene_lib.render(scene, rng)
  expressions = language.referring_expressions(scene, rng)
  narrative = language.narrate(scene, rng, config.narrative_order)
  return writers.Annotated(split, image_id, scene, narrative, expressions, first_ann_id), image


def _texts(item: writers.Annotated) -> list[str]:
  return ([language.caption(item.scene), item.narrative.caption]
          + [e.text for e in item.expressions] + language.region_phrases(item.scene)
          + list(INSTRUCTIONS))


def generate_world(out_dir: str, *, num_train: int, num_val: int, num_test: int,
                   config: scene_lib.WorldConfig | None = None,
                   seed: int | None = None, vocab_size: int = VOCAB_SIZE) -> dict:
  """Writes the world under `out_dir`; `seed` overrides `config.seed` when given.


  Returns {"paths": {name: path}, "counts": {split: {"images", "objects",
  "expressions"}}, "vocab_pieces": int, "seconds": float}.
  """
  start = time.perf_counter()
  config = scene_lib.WorldConfig() if config is None else config
  seed = config.seed if seed is None else seed
  writers.make_dirs(out_dir)
  paths, counts, all_items, texts = {}, {}, [], []
  image_id, ann_id = 1, 1
  for split, num in zip(SPLITS, (num_train, num_val, num_test)):
    items = []
    for index in range(num):
      item, image = _annotate(split, index, image_id, ann_id, seed, config)
      writers.write_image(image, item, out_dir)
      items.append(item)
      texts += _texts(item)
      image_id += 1
      ann_id += len(item.scene.objects)
    for name, path in writers.write_split_files(items, split, out_dir).items():
      paths[f"{name}/{split}"] = path
    counts[split] = {"images": len(items), "objects": sum(len(i.scene.objects) for i in items),
                     "expressions": sum(len(i.expressions) for i in items)}
    all_items += items
  paths.update(writers.write_refer(all_items, out_dir))
  model = tokenizer.train_sentencepiece(texts, vocab_size, model_type="bpe")
  paths["spiece"] = os.path.join(out_dir, "spiece.model")
  with open(paths["spiece"], "wb") as f:
    f.write(model)
  paths["images"] = os.path.join(out_dir, "images")
  return {"paths": paths, "counts": counts,
          "vocab_pieces": tokenizer.Tokenizer.from_proto(model).num_pieces,
          "seconds": time.perf_counter() - start}


FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", None, "Directory to write the world into.")
flags.DEFINE_integer("num_train", 3000, "Training scenes.")
flags.DEFINE_integer("num_val", 300, "Validation scenes.")
flags.DEFINE_integer("num_test", 300, "Test scenes.")
flags.DEFINE_integer("image_size", 64, "Image side in pixels.")
flags.DEFINE_integer("seed", 0, "Seed of every random draw.")
flags.DEFINE_enum("narrative_order", "left_to_right", language.NARRATIVE_ORDERS,
                  "Order in which a narrative names the objects.")


def main(argv):
  del argv
  config = scene_lib.WorldConfig(image_size=FLAGS.image_size, seed=FLAGS.seed,
                                  narrative_order=FLAGS.narrative_order)
  result = generate_world(FLAGS.out_dir, num_train=FLAGS.num_train, num_val=FLAGS.num_val,
                          num_test=FLAGS.num_test, config=config)
  for split, count in result["counts"].items():
    print(f"{split}: {count}")
  print(f"spiece.model: {result['vocab_pieces']} pieces; {result['seconds']:.1f} s -> {FLAGS.out_dir}")


if __name__ == "__main__":
  flags.mark_flag_as_required("out_dir")
  app.run(main)
