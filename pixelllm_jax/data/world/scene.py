"""Scenes of the generated grounded world: coloured shapes on a noisy background.

Choices (all sizes relative to `image_size`, so a 64 px world and a 384 px
world look alike):
- 5 shapes (circle, square, triangle, diamond, cross), 6 colours chosen far
  apart in RGB (red, green, blue, yellow, purple, white) on a grey background,
  2 sizes: small ~0.21 and big ~0.39 of the image side (12-14 / 22-26 px at 64 px).
- Shapes are evaluated analytically at pixel centres, so masks are exact. An
  object's `box_xyxy` is the tight box of its *full* (amodal) shape in pixel
  corner coordinates: pixel (c, r) spans [c, c+1) x [r, r+1).
- Objects are drawn in list order; later objects occlude earlier ones. Each
  object keeps at least 75% of its area visible, its visible part is one
  4-connected piece without holes (so one COCO polygon describes it), and it
  lies inside the image with a 1 px margin.
  Objects of the same colour stay 2 px apart, so their outlines stay visible.
- Attributes: every object after the first copies the shape, the colour, or
  both (then differing in size) from an earlier object, so every object has a
  distractor for referring expressions; no two objects share all three.
- `mask_outline` gives the visible mask's outline along pixel edges in COCO's
  convention (pixel (c, r) covers [c, c+1] x [r, r+1]): pycocotools' rasterizer
  (pixel centre inside) reproduces the mask exactly.
"""
import dataclasses

import numpy as np
from PIL import Image

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (215, 45, 45),
    "green": (45, 175, 70),
    "blue": (50, 90, 225),
    "yellow": (235, 210, 50),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
SIZES = ("small", "big")
_EXTENT = {"small": 0.21, "big": 0.39}  # shape diameter / image side
_MAX_OCCLUDED = 0.25
_MARGIN_PX = 1
_PLACEMENT_TRIES = 60


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """How scenes are sampled. `seed` is the default seed of `generate_world`."""
  image_size: int = 64
  min_objects: int = 2
  max_objects: int = 5
  seed: int = 0
  narrative_order: str = "left_to_right"  # language.NARRATIVE_ORDERS


@dataclasses.dataclass(frozen=True, eq=False)
class SceneObject:
  """One shape. `index` is its drawing order within the scene."""
  index: int
  shape: str
  colour: str
  size: str
  center_xy: tuple[float, float]        # pixels, corner convention
  box_xyxy: tuple[int, int, int, int]   # tight box of the full shape, pixels
  mask: np.ndarray                      # bool[H, W]: visible pixels

  @property
  def attributes(self) -> tuple[str, str, str]:
    return (self.size, self.colour, self.shape)

  @property
  def phrase(self) -> str:
    """"small red circle"."""
    return " ".join(self.attributes)


@dataclasses.dataclass(frozen=True, eq=False)
class Scene:
  """A square image's objects, in drawing order (objects[i].index == i)."""
  image_size: int
  objects: tuple[SceneObject, ...]


def shape_mask(shape: str, size: str, center_xy: tuple[float, float], image_size: int) -> np.ndarray:
  """bool[H, W]: pixels whose centre lies inside the full shape."""
  radius = _EXTENT[size] * image_size / 2
  centres = np.arange(image_size) + 0.5
  dx = (centres[None, :] - center_xy[0]) / radius  # [1, W], in units of the radius
  dy = (centres[:, None] - center_xy[1]) / radius  # [H, 1]
  if shape == "circle":
    return dx**2 + dy**2 <= 1.0
  if shape == "square":
    return (np.abs(dx) <= 0.9) & (np.abs(dy) <= 0.9)
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= 1.0
  if shape == "cross":
    arm = 0.34
    inside = (np.abs(dx) <= 1.0) & (np.abs(dy) <= 1.0)
    return inside & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
  if shape == "triangle":  # apex up, base at dy = 0.85, apex at dy = -0.95
    depth = (dy + 0.95) / 1.8  # 0 at the apex, 1 at the base
    return (depth >= 0) & (depth <= 1) & (np.abs(dx) <= depth)
  raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
  rows, cols = np.nonzero(mask)
  return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def _sample_attributes(rng: np.random.Generator, count: int) -> list[tuple[str, str, str]]:
  """(size, colour, shape) triples, pairwise distinct, each sharing shape or colour with an earlier one."""
  colours = list(COLOURS)
  triples = [(str(rng.choice(SIZES)), str(rng.choice(colours)), str(rng.choice(SHAPES)))]
  while len(triples) < count:
    _, colour, shape = triples[int(rng.integers(len(triples)))]
    mode = rng.choice(["shape", "colour", "both"], p=[0.4, 0.4, 0.2])
    new = (str(rng.choice(SIZES)),
           colour if mode != "shape" else str(rng.choice(colours)),
           shape if mode != "colour" else str(rng.choice(SHAPES)))
    if new not in triples:
      triples.append(new)
  return triples


def _visible_masks(full_masks: list[np.ndarray]) -> list[np.ndarray]:
  """Each mask minus everything drawn after it."""
  covered = np.zeros_like(full_masks[0])
  visible = [None] * len(full_masks)
  for i in reversed(range(len(full_masks))):
    visible[i] = full_masks[i] & ~covered
    covered |= full_masks[i]
  return visible  # type: ignore[return-value]


def _dilate(mask: np.ndarray) -> np.ndarray:
  """Grows a mask by one pixel (8-neighbourhood)."""
  padded = np.pad(mask, 1)
  out = np.zeros_like(mask)
  for dr in range(3):
    for dc in range(3):
      out |= padded[dr:dr + mask.shape[0], dc:dc + mask.shape[1]]
  return out


def _acceptable(full: np.ndarray, visible: np.ndarray) -> bool:
  """At most 25% occluded, and what stays visible is one hole-free piece."""
  if visible.sum() < (1 - _MAX_OCCLUDED) * full.sum():
    return False
  return visible.sum() == full.sum() or len(_outline_loops(visible)) == 1


def sample_scene(rng: np.random.Generator, config: WorldConfig) -> Scene:
  """A scene of `min_objects..max_objects` objects meeting the module's rules."""
  size = config.image_size
  count = int(rng.integers(config.min_objects, config.max_objects + 1))
  while True:  # restarts are rare: a crowded layout that leaves no room
    triples = _sample_attributes(rng, count)
    centers, full_masks = [], []
    for obj_size, colour, shape in triples:
      half = _EXTENT[obj_size] * size / 2
      lo, hi = half + _MARGIN_PX, size - half - _MARGIN_PX
      for _ in range(_PLACEMENT_TRIES):
        center = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        mask = shape_mask(shape, obj_size, center, size)
        same_colour = [f for f, t in zip(full_masks, triples) if t[1] == colour]
        if same_colour and (_dilate(_dilate(mask)) & np.logical_or.reduce(same_colour)).any():
          continue
        candidate = full_masks + [mask]
        visible = _visible_masks(candidate)
        if all(_acceptable(f, v) for f, v in zip(candidate, visible)):
          centers.append(center)
          full_masks.append(mask)
          break
      else:
        break
    if len(full_masks) == count:
      break
  visible = _visible_masks(full_masks)
  objects = tuple(
      SceneObject(index=i, shape=shape, colour=colour, size=obj_size, center_xy=centers[i],
                  box_xyxy=_tight_box(full_masks[i]), mask=visible[i])
      for i, (obj_size, colour, shape) in enumerate(triples))
  return Scene(image_size=size, objects=objects)


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
  """uint8[H, W, 3]: smooth low-contrast grey background, flat-shaded objects, pixel noise.

  The background stays within grey 70..150 with a small tint, far from every
  object colour; noise (sigma 5) is far below the colours' spacing.
  """
  size = scene.image_size
  grey = rng.uniform(90, 130)
  tint = rng.uniform(-6, 6, size=3)
  coarse = rng.uniform(-18, 18, size=(5, 5)).astype(np.float32)
  smooth = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC))
  image = np.clip(grey + tint[None, None, :] + smooth[:, :, None], 70, 150)
  for obj in scene.objects:
    shade = rng.uniform(-12, 12)
    image[obj.mask] = np.asarray(COLOURS[obj.colour], np.float64) + shade
  image = image + rng.normal(0.0, 5.0, size=image.shape)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _outline_loops(mask: np.ndarray) -> list[list[tuple[int, int]]]:
  """Closed loops of pixel-corner vertices along the mask's boundary edges.

  Edges are directed with the mask on their right (clockwise on screen); at a
  vertex with two outgoing edges the right turn is taken, which keeps
  diagonally touching pixels in separate loops (4-connectivity).
  """
  padded = np.pad(mask, 1)
  inner = padded[1:-1, 1:-1]
  outgoing: dict[tuple[int, int], list[tuple[int, int]]] = {}

  def add_edges(open_side: np.ndarray, start: tuple[int, int], end: tuple[int, int]) -> None:
    rows, cols = np.nonzero(inner & ~open_side)
    for r, c in zip(rows.tolist(), cols.tolist()):
      outgoing.setdefault((c + start[0], r + start[1]), []).append((c + end[0], r + end[1]))

  add_edges(padded[:-2, 1:-1], (0, 0), (1, 0))  # top edge, going right
  add_edges(padded[1:-1, 2:], (1, 0), (1, 1))   # right edge, going down
  add_edges(padded[2:, 1:-1], (1, 1), (0, 1))   # bottom edge, going left
  add_edges(padded[1:-1, :-2], (0, 1), (0, 0))  # left edge, going up
  loops = []
  while outgoing:
    start = min(outgoing)
    loop, prev, vertex = [start], None, start
    while True:
      targets = outgoing[vertex]
      if len(targets) == 1 or prev is None:
        nxt = targets[0]
      else:  # right turn in screen coordinates: cross product of (d_in, d_out) > 0
        d_in = (vertex[0] - prev[0], vertex[1] - prev[1])
        nxt = max(targets, key=lambda t: d_in[0] * (t[1] - vertex[1]) - d_in[1] * (t[0] - vertex[0]))
      targets.remove(nxt)
      if not targets:
        del outgoing[vertex]
      prev, vertex = vertex, nxt
      if vertex == start:
        break
      loop.append(vertex)
    loops.append(loop)
  return loops


def mask_outline(mask: np.ndarray) -> list[float]:
  """COCO polygon [x0, y0, x1, y1, ...]: the corners of the mask's pixel-edge outline.

  COCO convention: pixel (c, r) covers [c, c + 1] x [r, r + 1], and a pixel
  belongs to the polygon when its centre lies inside (pycocotools, and the
  refer builder's rasterizer), which gives back the mask exactly.
  Raises ValueError if the mask is not a single hole-free piece.
  """
  loops = _outline_loops(mask)
  if len(loops) != 1:
    raise ValueError(f"mask has {len(loops)} outline loops; expected one")
  loop = loops[0]
  polygon = []
  for i, v in enumerate(loop):
    a, b = loop[i - 1], loop[(i + 1) % len(loop)]
    if (v[0] - a[0], v[1] - a[1]) == (b[0] - v[0], b[1] - v[1]):
      continue  # not a corner
    polygon.extend([float(v[0]), float(v[1])])
  return polygon
