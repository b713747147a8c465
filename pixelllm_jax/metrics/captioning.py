"""Caption metrics: CIDEr, METEOR, BLEU, ROUGE-L (pycocoevalcap) and exact match.

Scorers are pycocoevalcap 1.2's, i.e. the coco-caption code the official evaluators call. Its
`Cider` is CIDEr-D (clipped n-gram counts, Gaussian length penalty, sigma 6, x10), with document
frequencies computed over the evaluated set, as in the official `LocaEvaluator`.

Scale: values are returned as the scorers return them, on the coco-caption scale, e.g. CIDEr 0.92
and METEOR 0.153. Papers print these x100 (the paper's "CIDEr 92.0, METEOR 15.3").

Tokenization (deliberate deviation): coco-caption runs the Stanford PTB tokenizer in Java and then
drops punctuation tokens. We use an offline rule instead, `normalize_caption`:
  1. lowercase;
  2. delete apostrophes (' and the typographic ’), so "dog's" -> "dogs", "don't" -> "dont";
  3. replace every other non-alphanumeric, non-space character (and "_") with a space, so
     "t-shirt" -> "t shirt" and "left." -> "left";
  4. split on whitespace and re-join with single spaces.
PTB would instead keep "t-shirt" and split "dog 's", so scores can differ slightly from a PTB run on
text with hyphens or clitics; they are identical on plain lower-case words.

Inputs: `predictions` maps an id (image, box or expression) to one caption; `references` maps the
same ids to one or more reference captions. Both must have the same keys.
"""
from collections.abc import Hashable, Mapping, Sequence
import re
import shutil

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

Predictions = Mapping[Hashable, str]
References = Mapping[Hashable, Sequence[str]]

_APOSTROPHES = re.compile(r"['\u2019]")
_NON_WORD = re.compile(r"[^\w\s]|_")


def normalize_caption(text: str) -> str:
  """The offline tokenization described in the module docstring; tokens joined by one space."""
  text = _APOSTROPHES.sub("", text.lower())
  return " ".join(_NON_WORD.sub(" ", text).split())


def tokenize(predictions: Predictions, references: References
             ) -> tuple[dict[Hashable, list[str]], dict[Hashable, list[str]]]:
  """-> (gts, res) in pycocoevalcap's input format: id -> list of normalized captions."""
  if set(predictions) != set(references):
    missing = set(references) ^ set(predictions)
    raise ValueError(f"predictions and references differ on {len(missing)} ids, e.g. "
                     f"{sorted(map(str, missing))[:3]}")
  res = {key: [normalize_caption(predictions[key])] for key in predictions}
  gts = {}
  for key in predictions:
    refs = references[key]
    if isinstance(refs, str) or not refs:
      raise ValueError(f"references[{key!r}] must be a non-empty list of strings")
    gts[key] = [normalize_caption(ref) for ref in refs]
  return gts, res


def cider(predictions: Predictions, references: References) -> float:
  """Corpus CIDEr-D (coco-caption scale, e.g. 1.23)."""
  gts, res = tokenize(predictions, references)
  score, _ = Cider().compute_score(gts, res)
  return float(score)


def bleu(predictions: Predictions, references: References) -> list[float]:
  """Corpus BLEU-1..4 (coco-caption's 'closest' reference length), each in [0, 1]."""
  gts, res = tokenize(predictions, references)
  scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
  return [float(s) for s in scores]


def rouge_l(predictions: Predictions, references: References) -> float:
  """Mean per-caption ROUGE-L (beta 1.2), in [0, 1]."""
  gts, res = tokenize(predictions, references)
  score, _ = Rouge().compute_score(gts, res)
  return float(score)


def meteor(predictions: Predictions, references: References) -> float:
  """Corpus METEOR 1.5 (pycocoevalcap's bundled jar, '-l en -norm'), in [0, 1].

  Starts a JVM (about 14 s, 2 GB heap) for each call; batch everything into one call.
  Raises RuntimeError when no `java` executable is on PATH.
  """
  if shutil.which("java") is None:
    raise RuntimeError("METEOR needs Java (pycocoevalcap runs meteor-1.5.jar with `java`); "
                       "install a JRE (>= 8) and put `java` on PATH, or skip METEOR.")
  gts, res = tokenize(predictions, references)
  scorer = Meteor()
  try:
    score, _ = scorer.compute_score(gts, res)
  finally:
    del scorer  # its __del__ closes the pipe and kills the JVM
  return float(score)


def exact_match(predictions: Predictions, references: References) -> float:
  """Fraction of ids whose normalized prediction equals any of its normalized references."""
  gts, res = tokenize(predictions, references)
  if not res:
    return float("nan")
  hits = [res[key][0] in gts[key] for key in res]
  return sum(hits) / len(hits)


def caption_scores(predictions: Predictions, references: References,
                   with_meteor: bool = True) -> dict[str, float]:
  """All caption metrics under coco-caption's names (plus 'exact_match'), for logging."""
  scores = {f"Bleu_{n}": s for n, s in enumerate(bleu(predictions, references), start=1)}
  scores["ROUGE_L"] = rouge_l(predictions, references)
  scores["CIDEr"] = cider(predictions, references)
  if with_meteor:
    scores["METEOR"] = meteor(predictions, references)
  scores["exact_match"] = exact_match(predictions, references)
  return scores
