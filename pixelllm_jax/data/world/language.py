"""Language of the generated world: captions, referring expressions, region phrases.

- Caption: every object as "size colour shape", left to right:
  "a small red circle, a big blue square and a green cross".
- Region phrase (VG): "small red circle", one per object.
- Referring expressions: one or two per object, each naming it uniquely with
  more than one attribute or with a spatial relation:
  "small red one", "red circle on the left", "blue one below the red circle".
  Their meaning is a `Description` evaluated by `referents`; the generator
  keeps an expression only when exactly one object satisfies it, and spatial
  words are used only when the winner leads the others by a clear margin
  (`MARGIN` of the image side), so a reader with any threshold in
  [MARGIN / 2, MARGIN] gets the same answer.
- Narrative (Localized Narratives style, `narrate`): "there is a small red
  circle on the left and a big blue square ...", objects left to right (or in a
  random order, `order="random"`: pointing then depends on what a word names,
  not on its place in the sentence), at most `MAX_NARRATIVE_WORDS` words (a
  location phrase is added to an object only while the budget allows). One
  timed utterance per word, about 3 words a second with short gaps. A 25 Hz
  mouse trace circles inside each object's box from just before its first
  attribute word until just after its last word, and travels on a curved path
  between objects while the function words ("and a") are spoken. The trace
  may start slightly outside the image (rarely), and is sometimes split into
  two segments during a travel.
"""
import dataclasses
import itertools

import numpy as np

from pixelllm_jax.data.world.scene import Scene, SceneObject

MARGIN = 0.1  # fraction of the image side separating "left of" from "not left of"
DIRECTIONS = ("left", "right", "top", "bottom")
RELATIONS = ("left of", "right of", "above", "below")
_DIRECTION_TEXT = {"left": "on the left", "right": "on the right", "top": "at the top",
                   "bottom": "at the bottom"}


@dataclasses.dataclass(frozen=True)
class Description:
  """What an expression means.

  attributes: (name, value) pairs, e.g. (("colour", "red"), ("shape", "circle")).
  direction: the most extreme match along one of DIRECTIONS, or None.
  relation / landmark: matches standing in RELATIONS to the one object that
  `landmark` describes, or None.
  """
  attributes: tuple[tuple[str, str], ...]
  direction: str | None = None
  relation: str | None = None
  landmark: "Description | None" = None

  def text(self) -> str:
    values = dict(self.attributes)
    words = [values[a] for a in ("size", "colour") if a in values]
    words.append(values.get("shape", "one"))
    if self.direction:
      words.append(_DIRECTION_TEXT[self.direction])
    if self.relation:
      words += [self.relation, "the", self.landmark.text()]
    return " ".join(words)


@dataclasses.dataclass(frozen=True)
class Expression:
  text: str
  object_index: int
  description: Description


def _matches(obj: SceneObject, attributes) -> bool:
  return all(getattr(obj, name) == value for name, value in attributes)


def _centre(obj: SceneObject, size: int) -> tuple[float, float]:
  x0, y0, x1, y1 = obj.box_xyxy
  return (x0 + x1) / (2 * size), (y0 + y1) / (2 * size)


def relation_margin(a: SceneObject, b: SceneObject, relation: str, size: int) -> float:
  """How far `a` stands in `relation` to `b` (fraction of the image; negative: not at all)."""
  (ax, ay), (bx, by) = _centre(a, size), _centre(b, size)
  return {"left of": bx - ax, "right of": ax - bx, "above": by - ay, "below": ay - by}[relation]


def _extremeness(obj: SceneObject, direction: str, size: int) -> float:
  x, y = _centre(obj, size)
  return {"left": -x, "right": x, "top": -y, "bottom": y}[direction]


def referents(scene: Scene, description: Description, margin: float = MARGIN) -> list[int]:
  """Indices of the objects `description` picks out, at spatial threshold `margin`."""
  size = scene.image_size
  found = [o for o in scene.objects if _matches(o, description.attributes)]
  if description.relation:
    landmarks = referents(scene, description.landmark, margin)
    if len(landmarks) != 1:
      return []
    landmark = scene.objects[landmarks[0]]
    found = [o for o in found if o is not landmark and
             relation_margin(o, landmark, description.relation, size) > margin]
  if description.direction and found:
    ranked = sorted(found, key=lambda o: -_extremeness(o, description.direction, size))
    lead = (_extremeness(ranked[0], description.direction, size)
            - _extremeness(ranked[1], description.direction, size)) if len(ranked) > 1 else 1.0
    found = ranked[:1] if lead > margin else ranked
  return sorted(o.index for o in found)


def _is_clear(scene: Scene, description: Description, index: int) -> bool:
  return all(referents(scene, description, m) == [index] for m in (MARGIN / 2, MARGIN))


def _attribute_sets(obj: SceneObject, count: int) -> list[tuple[tuple[str, str], ...]]:
  """All `count`-subsets of obj's attributes, colour first, then shape, then size."""
  return [tuple((a, getattr(obj, a)) for a in names)
          for names in itertools.combinations(("colour", "shape", "size"), count)]


def _minimal_description(scene: Scene, obj: SceneObject, min_attributes: int,
                         rng: np.random.Generator | None = None) -> Description:
  """An attribute-only description naming obj alone, with as few attributes as possible (>= min).

  Among equally short ones: a random one with `rng`, else the first in the
  order colour, shape, size.
  """
  for count in range(min_attributes, 4):
    sets = _attribute_sets(obj, count)
    order = rng.permutation(len(sets)) if rng is not None else range(len(sets))
    for k in order:
      if referents(scene, Description(sets[k])) == [obj.index]:
        return Description(sets[k])
  raise AssertionError("objects are unique by all three attributes")


def _spatial_description(scene: Scene, obj: SceneObject, rng: np.random.Generator) -> Description | None:
  """A random unambiguous description of obj that needs a direction or a relation, if any."""
  candidates = []
  for attributes in _attribute_sets(obj, 1) + _attribute_sets(obj, 2):
    if len(referents(scene, Description(attributes))) < 2:
      continue  # the attributes alone suffice; a spatial word would be idle
    candidates += [(attributes, d, None, None) for d in DIRECTIONS]
    candidates += [(attributes, None, r, other) for other in scene.objects if other is not obj
                   for r in RELATIONS]
  for k in rng.permutation(len(candidates)):
    attributes, direction, relation, other = candidates[k]
    landmark = _minimal_description(scene, other, 1) if other is not None else None
    candidate = Description(attributes, direction, relation, landmark)
    if _is_clear(scene, candidate, obj.index):
      return candidate
  return None


def referring_expressions(scene: Scene, rng: np.random.Generator) -> list[Expression]:
  """One or two unambiguous expressions per object, in object order.

  The first names the object by its fewest attributes (at least two); a
  second, spatial one is added when a coin (p = 0.7) says so and one exists.
  """
  out = []
  for obj in scene.objects:
    descriptions = [_minimal_description(scene, obj, 2, rng)]
    if rng.random() < 0.7:
      spatial = _spatial_description(scene, obj, rng)
      if spatial is not None:
        descriptions.append(spatial)
    out += [Expression(d.text(), obj.index, d) for d in descriptions]
  return out


def left_to_right(scene: Scene) -> list[SceneObject]:
  return sorted(scene.objects, key=lambda o: (o.box_xyxy[0] + o.box_xyxy[2], o.index))


def caption(scene: Scene) -> str:
  """"a small red circle, a big blue square and a green cross" (left to right)."""
  parts = [f"a {obj.phrase}" for obj in left_to_right(scene)]
  return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def region_phrases(scene: Scene) -> list[str]:
  """One phrase per object, in object order: "small red circle"."""
  return [obj.phrase for obj in scene.objects]


def location_phrase(obj: SceneObject, size: int) -> str:
  """Where obj sits in the image: "on the left", ..., "in the middle"."""
  offset = np.asarray(_centre(obj, size)) - 0.5
  axis = int(np.argmax(np.abs(offset)))
  if abs(offset[axis]) < 0.15:
    return "in the middle"
  return _DIRECTION_TEXT[("left", "right", "top", "bottom")[2 * axis + int(offset[axis] > 0)]]


MAX_NARRATIVE_WORDS = 28
TRACE_HZ = 25.0
_OPENINGS = (("there", "is", "a"), ("i", "see", "a"), ("this", "picture", "shows", "a"))
_LINKS = (("and", "a"), ("then", "a"))


@dataclasses.dataclass(frozen=True)
class Narrative:
  """A Localized-Narratives annotation of one scene.

  timed_caption: [{utterance, start_time, end_time}], one per word, seconds.
  traces: [[{x, y, t}, ...], ...] normalized, origin top-left.
  utterance_objects: per utterance the index of the object whose size, colour
    or shape it names, else -1.
  """
  caption: str
  timed_caption: list[dict]
  traces: list[list[dict]]
  utterance_objects: list[int]


NARRATIVE_ORDERS = ("left_to_right", "random")


def _narrative_words(scene: Scene, rng: np.random.Generator,
                     order: str) -> tuple[list[str], list[int], list[int]]:
  """(words, object named per word or -1, object the mouse rests on per word or -1)."""
  objects = left_to_right(scene)
  if order == "random":
    objects = [objects[k] for k in rng.permutation(len(objects))]
  leads = [_OPENINGS[int(rng.integers(len(_OPENINGS)))]]
  leads += [_LINKS[int(rng.integers(len(_LINKS)))] for _ in objects[1:]]
  budget = MAX_NARRATIVE_WORDS - sum(len(lead) + 3 for lead in leads)
  words, named, resting = [], [], []
  for lead, obj in zip(leads, objects):
    where = location_phrase(obj, scene.image_size).split()
    if len(where) > budget or rng.random() < 0.4:
      where = []
    budget -= len(where)
    words += [*lead, *obj.attributes, *where]
    named += [-1] * len(lead) + [obj.index] * 3 + [-1] * len(where)
    resting += [-1] * len(lead) + [obj.index] * (3 + len(where))
  return words, named, resting


def _word_times(words: list[str], rng: np.random.Generator) -> np.ndarray:
  """float64[U, 2] (start, end) seconds, increasing, with gaps of 30-120 ms."""
  times, t = [], float(rng.uniform(0.4, 1.0))
  for word in words:
    duration = (0.16 + 0.045 * len(word)) * rng.uniform(0.85, 1.15)
    times.append((t, t + duration))
    t += duration + rng.uniform(0.03, 0.12)
  return np.round(np.asarray(times), 3)


def _box01(obj: SceneObject, size: int, shrink: float) -> np.ndarray:
  """Normalized xyxy box of obj, shrunk towards its centre by `shrink` of its width/height."""
  x0, y0, x1, y1 = np.asarray(obj.box_xyxy, np.float64) / size
  dx, dy = shrink * (x1 - x0), shrink * (y1 - y0)
  return np.array([x0 + dx, y0 + dy, x1 - dx, y1 - dy])


def _mouse_path(scene: Scene, rng: np.random.Generator, times_T: np.ndarray, dwell) -> np.ndarray:
  """float64[T, 2] mouse positions; `dwell` is [(object index, t_start, t_end)] in time order."""
  size = scene.image_size
  noise_Tx2 = rng.normal(0, 0.003, (len(times_T), 2))
  start = rng.uniform(0.05, 0.95, 2)
  if rng.random() < 0.1:  # real traces sometimes begin just off the image
    stray = rng.uniform(0.005, 0.02)
    start[int(rng.integers(2))] = -stray if rng.random() < 0.5 else 1 + stray
  path_Tx2 = np.empty((len(times_T), 2))
  left_at, t_left = start, times_T[0]
  for index, t_start, t_end in dwell:
    obj = scene.objects[index]
    box = _box01(obj, size, 0.15)
    rows, cols = np.nonzero(obj.mask)
    centre = np.clip([(cols.mean() + 0.5) / size, (rows.mean() + 0.5) / size], box[:2], box[2:])
    radius = 0.2 * min(box[2] - box[0], box[3] - box[1]) / 0.7
    phase, speed = rng.uniform(0, 2 * np.pi), rng.choice([-1, 1]) * rng.uniform(3.0, 7.0)
    bend = rng.normal(0, 0.08)

    def circle(t_S, centre=centre, radius=radius, phase=phase, speed=speed, box=box):
      angle = phase + speed * (t_S - t_start)
      return np.clip(centre + radius * np.stack([np.cos(angle), np.sin(angle)], -1), box[:2], box[2:])

    # Travel from where the mouse left the previous object along a bent path.
    travel = (times_T > t_left) & (times_T < t_start)
    arrive = circle(np.array([t_start]))[0]
    u_S = np.clip((times_T[travel] - t_left) / max(t_start - t_left, 1e-6), 0, 1)[:, None]
    s_S = u_S * u_S * (3 - 2 * u_S)
    direction = arrive - left_at
    normal = np.array([-direction[1], direction[0]])
    path_Tx2[travel] = left_at + s_S * direction + bend * np.sin(np.pi * s_S) * normal
    path_Tx2[travel] += noise_Tx2[travel]
    if t_left == times_T[0]:
      path_Tx2[times_T <= t_left] = left_at
    on = (times_T >= t_start) & (times_T <= t_end)
    path_Tx2[on] = np.clip(circle(times_T[on]) + noise_Tx2[on], box[:2], box[2:])
    if on.any():
      left_at = path_Tx2[on][-1]
    t_left = t_end
  after = times_T > t_left
  path_Tx2[after] = left_at + 0.5 * noise_Tx2[after]  # resting after the last object
  return path_Tx2


def narrate(scene: Scene, rng: np.random.Generator, order: str = "left_to_right") -> Narrative:
  """A narrative with one timed utterance per word and a mouse trace (see module docstring).

  order: the order objects are named in, one of NARRATIVE_ORDERS.
  """
  if order not in NARRATIVE_ORDERS:
    raise ValueError(f"narrative order must be one of {NARRATIVE_ORDERS}, got {order!r}")
  words, named, resting = _narrative_words(scene, rng, order)
  times_Ux2 = _word_times(words, rng)
  dwell = []
  for index in dict.fromkeys(r for r in resting if r >= 0):
    spoken = [u for u, r in enumerate(resting) if r == index]
    t_start = times_Ux2[spoken[0], 0] - 0.1
    t_end = times_Ux2[spoken[-1], 1] + 0.06
    if dwell:
      t_start = max(t_start, dwell[-1][2] + 0.2)
    dwell.append((index, t_start, t_end))
  t0 = max(0.0, times_Ux2[0, 0] - 0.3)
  times_T = np.round(np.arange(t0, times_Ux2[-1, 1] + 0.3, 1 / TRACE_HZ), 3)
  path_Tx2 = np.round(_mouse_path(scene, rng, times_T, dwell), 4)
  points = [{"x": float(x), "y": float(y), "t": float(t)} for (x, y), t in zip(path_Tx2, times_T)]
  segments = [points]
  travelling = [k for k, t in enumerate(times_T) if 5 < k < len(times_T) - 5
                and not any(a - 0.1 <= t <= b + 0.1 for _, a, b in dwell)]
  if travelling and rng.random() < 0.3:  # a pause in recording: drop two samples
    k = travelling[int(rng.integers(len(travelling)))]
    segments = [points[:k], points[k + 2:]]
  timed = [{"utterance": w, "start_time": float(a), "end_time": float(b)}
           for w, (a, b) in zip(words, times_Ux2)]
  return Narrative(" ".join(words), timed, segments, named)
