"""Input-pipeline throughput on this machine: training (JPEG decode, augment,
tokenize, batch) and evaluation, in examples per second per CPU core.

  .venv/bin/python scripts/benchmark_pipeline.py [--num_train=200] [--jpeg_hw=480,640]

What it does (and so what the numbers mean):
1. Generates a small world at --world_size px (PNG), then writes a JPEG copy of
   it in the *official* layouts the real datasets ship in: LN-COCO (sharded
   JSONL + coco/train2017/{id:012d}.jpg), RefCOCOg umd (refer/refcocog/refs(umd).p
   + instances.json, images in coco/train2014/), GRiT VG (vg/annotations/
   {train,test}.json, vg/images/). The JPEGs are resampled to --jpeg_hw
   (default 480x640, COCO-like) at --jpeg_quality; pixel annotations
   (boxes, polygons, areas) are scaled with them, LN coordinates are normalized.
2. Prepares the real builder configs (localized_narratives/coco,
   refer/refcocog_umd, vg_densecap/grit) from that copy: the records keep the
   JPEG bytes, so every read decodes a JPEG. Refer records also hold one PNG
   mask per object, as RefCOCO's do; the box tasks leave them encoded
   (`Task.unread_features`), and "reads alone" times them decoded too.
3. Training: the gin-like mixture trace 2 : caption 0.5 : refer 2 : loca 1 with
   the official per-dataset augmentation (each Task.official_augment) on a --canvas px
   canvas, tokenized with the world's sentencepiece model (T5 ids), batched.
   Each source is also timed alone. Evaluation: `pipeline.eval_batches` over
   the val splits (long side = canvas, padded).
Per-core numbers are examples / CPU-second of this process and its live
descendants (the grain workers, read from /proc), so other jobs on the machine
barely move them. With --worker_count=0 everything runs in this one thread;
with workers their CPU counts too (after a warm-up batch), and with it the cost
of shipping batches between processes. The wall-clock rate is printed too: with W
workers on W idle cores it is the host's rate; "cores busy" (CPU / wall) says
how many cores the run really got. It asserts nothing about speed.
"""
import argparse
import json
import os
import pickle
import shutil
import tempfile
import time

from absl import flags
from PIL import Image
import tensorflow_datasets as tfds

from pixelllm_jax import tasks
from pixelllm_jax.data import augment, pipeline, sources as sources_lib
from pixelllm_jax.data.builders import common
from pixelllm_jax.tasks import TaskConfig
from pixelllm_jax.data.tokenizer import Tokenizer
from pixelllm_jax.data.world import generate, scene

MIXTURE = (("trace", 2.0), ("caption", 0.5), ("refer", 2.0), ("loca", 1.0))
BUILDER = {"trace": ("localized_narratives", "coco"), "caption": ("localized_narratives", "coco"),
           "refer": ("refer", "refcocog_umd"), "loca": ("vg_densecap", "grit")}


def _jpeg(src: str, dst: str, hw: tuple[int, int], quality: int):
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  with Image.open(src) as image:
    image.convert("RGB").resize(hw[::-1], Image.BILINEAR).save(dst, quality=quality)


def _scale_annotations(coco: dict, sx: float, sy: float, names: dict[int, str]) -> dict:
  for image in coco["images"]:
    image["file_name"] = names[image["id"]]
    image["width"], image["height"] = round(image["width"] * sx), round(image["height"] * sy)
  for ann in coco["annotations"]:
    x, y, w, h = ann["bbox"]
    ann["bbox"] = [x * sx, y * sy, w * sx, h * sy]
    if "segmentation" in ann:
      ann["segmentation"] = [[v * (sx if i % 2 == 0 else sy) for i, v in enumerate(poly)]
                             for poly in ann["segmentation"]]
    if "area" in ann:
      ann["area"] = ann["area"] * sx * sy
  return coco


def make_jpeg_layouts(world: str, out: str, hw: tuple[int, int], size: int, quality: int):
  """The world's annotations in the official LN-COCO / RefCOCOg / GRiT-VG layouts, JPEG images."""
  sx, sy = hw[1] / size, hw[0] / size
  ln = os.path.join(out, "localized_narratives")
  os.makedirs(ln, exist_ok=True)
  lines = {}
  for split, coco_split in (("train", "train2017"), ("val", "val2017")):
    with open(os.path.join(world, "localized_narratives",
                           f"world_{split}_localized_narratives.jsonl")) as f:
      lines[split] = f.readlines()
    for line in lines[split]:
      image_id = int(json.loads(line)["image_id"])
      _jpeg(os.path.join(world, "images", f"world_{split}_{image_id:06d}.png"),
            os.path.join(out, "coco", coco_split, f"{image_id:012d}.jpg"), hw, quality)
  for i in range(4):
    with open(os.path.join(ln, f"coco_train_localized_narratives-{i:05d}-of-00004.jsonl"), "w") as f:
      f.writelines(lines["train"][i::4])
  shutil.copy(os.path.join(world, "localized_narratives", "world_val_localized_narratives.jsonl"),
              os.path.join(ln, "coco_val_localized_narratives.jsonl"))
  # RefCOCOg (umd) in the refer layout, COCO train2014 image names.
  with open(os.path.join(world, "refer", "world", "instances.json")) as f:
    instances = json.load(f)
  names = {im["id"]: f"COCO_train2014_{im['id']:012d}.jpg" for im in instances["images"]}
  for im in instances["images"]:
    _jpeg(os.path.join(world, "images", im["file_name"]),
          os.path.join(out, "coco", "train2014", names[im["id"]]), hw, quality)
  refer_dir = os.path.join(out, "refer", "refcocog")
  os.makedirs(refer_dir, exist_ok=True)
  with open(os.path.join(refer_dir, "instances.json"), "w") as f:
    json.dump(_scale_annotations(instances, sx, sy, names), f)
  refs = common.load_plain_pickle(os.path.join(world, "refer", "world", "refs(umd).p"))
  for ref in refs:
    ref["file_name"] = names[ref["image_id"]].replace(".jpg", f"_{ref['ann_id']}.jpg")
  with open(os.path.join(refer_dir, "refs(umd).p"), "wb") as f:
    pickle.dump(refs, f)
  # GRiT VG: world train -> train, world val -> test.
  for split, grit_split in (("train", "train"), ("val", "test")):
    with open(os.path.join(world, "vg", f"{split}.json")) as f:
      vg = json.load(f)
    vg_names = {im["id"]: f"{im['id']}.jpg" for im in vg["images"]}
    for im in vg["images"]:
      _jpeg(os.path.join(world, "images", im["file_name"]),
            os.path.join(out, "vg", "images", vg_names[im["id"]]), hw, quality)
    os.makedirs(os.path.join(out, "vg", "annotations"), exist_ok=True)
    with open(os.path.join(out, "vg", "annotations", f"{grit_split}.json"), "w") as f:
      json.dump(_scale_annotations(vg, sx, sy, vg_names), f)


def _short(cfg: augment.AugmentConfig) -> str:
  return (f"scale {cfg.min_scale:g}-{cfg.max_scale:g}" + (" +crop" if cfg.crop else "")
          + (" +flip" if cfg.flip else ""))


def _descendants_cpu() -> dict[int, float]:
  """{pid: CPU seconds} of this process's live descendants (Linux /proc; {} elsewhere)."""
  parent, cpu = {}, {}
  for pid in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else ()):
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after "pid (name)"
    except OSError:  # exited meanwhile
      continue
    parent[int(pid)] = int(fields[1])
    cpu[int(pid)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  ours, frontier = set(), {os.getpid()}
  while frontier:
    frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - ours
    ours |= frontier
  return {pid: cpu[pid] for pid in ours}


def _time(fn) -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process and its descendants) of fn()."""
  wall, cpu, before = time.perf_counter(), time.process_time(), _descendants_cpu()
  fn()
  after = _descendants_cpu()
  children = sum(t - before.get(pid, 0.0) for pid, t in after.items())
  return time.perf_counter() - wall, time.process_time() - cpu + children


def _report(name: str, examples: int, wall: float, cpu: float):
  print(f"{name:<44s} {examples:5d} ex  {examples / wall:8.1f} ex/s wall  "
        f"{examples / cpu:8.1f} ex/s per core  ({cpu / wall:4.2f} cores busy)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_train", type=int, default=200)
  parser.add_argument("--num_val", type=int, default=50)
  parser.add_argument("--world_size", type=int, default=384)
  parser.add_argument("--jpeg_hw", default="480,640")
  parser.add_argument("--jpeg_quality", type=int, default=90)
  parser.add_argument("--canvas", type=int, default=384)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--num_slots", type=int, default=8)
  parser.add_argument("--num_batches", type=int, default=40)
  parser.add_argument("--worker_count", type=int, default=0)
  parser.add_argument("--work_dir", default=None, help="kept if given, else a temp dir")
  args = parser.parse_args()
  tfds.disable_progress_bar()
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  hw = tuple(int(v) for v in args.jpeg_hw.split(","))
  root = args.work_dir or tempfile.mkdtemp(prefix="pixelllm_bench_")
  world, manual = os.path.join(root, "world"), os.path.join(root, "manual")
  try:
    if not os.path.exists(os.path.join(world, "spiece.model")):
      generate.generate_world(world, num_train=args.num_train, num_val=args.num_val, num_test=2,
                              config=scene.WorldConfig(image_size=args.world_size), seed=0)
    if not os.path.exists(manual):
      make_jpeg_layouts(world, manual, hw, args.world_size, args.jpeg_quality)
    sources = {}
    for task, (name, config) in BUILDER.items():
      builder = common.prepare(name, config, manual, os.path.join(root, "tfds"))
      sources[task] = {split: sources_lib.task_data_source(builder, split, task)
                       for split in ("train", "val" if task != "loca" else "test")}
      if task == "refer":
        refer_all_decoded = builder.as_data_source("train")
    tokenizer = Tokenizer.from_file(os.path.join(world, "spiece.model"), extra_ids=0)
    config = TaskConfig()
    sample = sources["refer"]["train"][0]["image"]
    print(f"decoded per read: JPEG {sample.shape[0]}x{sample.shape[1]} (quality "
          f"{args.jpeg_quality}) via tfds data_source; refer's PNG masks (1 per object) stay "
          f"encoded. "
          f"canvas {args.canvas}, TaskConfig L={config.max_target_len} Lc={config.max_context_len} "
          f"P={config.points_per_token}, N={args.num_slots} slots, batch {args.batch_size}, "
          f"grain workers {args.worker_count} (machine has {os.cpu_count()} cores)")

    def train(mixture):
      ds = pipeline.make_train_dataset(
          [pipeline.TaskSource(t, sources[t]["train"], w, tasks.get(t).official_augment) for t, w in mixture],
          tokenizer, config, batch_size=args.batch_size, num_slots=args.num_slots,
          num_prompts=args.num_slots, seed=0, canvas_size=args.canvas,
          worker_count=args.worker_count)
      it = iter(ds)
      next(it)  # warm-up (worker start, first reads)
      wall, cpu = _time(lambda: [next(it) for _ in range(args.num_batches)])
      it.close()  # its workers stop before the next source is timed
      return args.num_batches * args.batch_size, wall, cpu

    print("training (decode + augment + tokenize + batch):")
    _report("mixture " + " ".join(f"{t}:{w}" for t, w in MIXTURE), *train(MIXTURE))
    for task, _ in MIXTURE:
      _report(f"  {task} alone ({_short(tasks.get(task).official_augment)})", *train([(task, 1.0)]))
    print("reads alone (tfds data_source[i]: record decode incl. JPEG, one thread):")
    for name, data in (("trace", sources["trace"]["train"]), ("refer", sources["refer"]["train"]),
                       ("refer, masks decoded", refer_all_decoded), ("loca", sources["loca"]["train"])):
      n = min(len(data), 100)
      wall, cpu = _time(lambda: [data[i] for i in range(n)])
      task = name.split(",")[0]
      _report(f"  {BUILDER[task][0]}/{BUILDER[task][1]}{name[len(task):]}", n, wall, cpu)
    print("evaluation (decode + resize/pad + tokenize + batch, one thread):")
    for task in ("refer", "loca", "trace"):
      data = sources[task]["val" if task != "loca" else "test"]
      count = [0]

      def run_eval():
        for batch, metas in pipeline.eval_batches(
            task, data, tokenizer, config, batch_size=args.batch_size, num_slots=args.num_slots,
            num_prompts=args.num_slots, canvas_size=args.canvas):
          count[0] += 1
      wall, cpu = _time(run_eval)
      _report(f"  {task} ({len(data)} images, {count[0]} batches)", len(data), wall, cpu)
  finally:
    if args.work_dir is None:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
