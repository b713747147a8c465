"""Caption metrics as the COCO caption toolkit computes them: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D.

Everything is pycocoevalcap 1.2's code, run as its `COCOEvalCap.evaluate` runs it (less SPICE):
  1. tokenize references and predictions (two calls) with its PTB tokenizer (`java_tools`);
  2. score the tokenized text with `Bleu(4)`, `Meteor()`, `Rouge()` and `Cider()`, each over the
     whole set: BLEU pools n-gram counts (brevity penalty against the closest reference length),
     METEOR sums alignment statistics, ROUGE-L (beta 1.2) and CIDEr-D average per-id scores.
  `tests/test_metrics.py` checks that the numbers equal `COCOEvalCap`'s exactly.

CIDEr-D is the toolkit's `Cider`: n = 1..4, tf-idf vectors with document frequencies over the
evaluated set (the official evaluators do the same), n-gram counts clipped to the reference's,
a Gaussian penalty exp(-d^2 / (2 * 6^2)) on the length difference d, averaged over references, x10.

Scale: values are returned as the toolkit returns them, e.g. CIDEr 0.92 and METEOR 0.153; papers
print them x100 (the paper's "CIDEr 92.0, METEOR 15.3").

Inputs: `predictions` maps an id (an image, a region) to its one caption; `references` maps the same
ids to ALL reference captions of that image or region (COCO: 5 per image). Each prediction is scored
against all of its references at once: BLEU clips n-gram counts to the largest count in any
reference, METEOR takes the best-matching reference, ROUGE-L the best LCS score and CIDEr-D the mean
over references.

Tokenization: `tokenization="ptb"` (the default) is the toolkit's and needs Java (`java_tools`);
without `java` the call fails naming the package to install. `tokenization="offline"` (with
`meteor=False`: METEOR needs Java too) is an explicit opt-out whose numbers are NOT the toolkit's:
`normalize_caption` lowercases, deletes apostrophes ("dog's" -> "dogs"), turns any other
punctuation into a space ("t-shirt" -> "t shirt") and splits on whitespace, whereas PTB keeps
"t-shirt" and splits "dog 's". Evaluation reads the choice from PIXELLLM_CAPTION_METRICS
(`settings_from_env`).
"""
from collections.abc import Hashable, Mapping, Sequence
import os
import re

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from pixelllm_jax.metrics import java_tools

Predictions = Mapping[Hashable, str]
References = Mapping[Hashable, Sequence[str]]
Tokenized = dict[Hashable, list[str]]

TOKENIZATIONS = ("ptb", "offline")
ENV_VAR = "PIXELLLM_CAPTION_METRICS"
# PIXELLLM_CAPTION_METRICS value -> caption_scores settings.
ENV_SETTINGS = {"toolkit": {"tokenization": "ptb", "meteor": True},
                "offline": {"tokenization": "offline", "meteor": False}}

_APOSTROPHES = re.compile(r"['\u2019]")
_NON_WORD = re.compile(r"[^\w\s]|_")


def settings_from_env() -> dict:
  """`caption_scores` settings chosen by $PIXELLLM_CAPTION_METRICS: unset or 'toolkit' (PTB and
  METEOR, needs Java) or 'offline' (offline tokenization, no METEOR: not the toolkit's numbers)."""
  value = os.environ.get(ENV_VAR, "toolkit")
  if value not in ENV_SETTINGS:
    raise ValueError(f"{ENV_VAR}={value!r}: expected one of {sorted(ENV_SETTINGS)}")
  return dict(ENV_SETTINGS[value])


def check_available(tokenization: str = "ptb", meteor: bool = True) -> None:
  """Raises before any work if these settings cannot run here (unknown tokenization, no Java)."""
  if tokenization not in TOKENIZATIONS:
    raise ValueError(f"tokenization={tokenization!r}: expected one of {TOKENIZATIONS}")
  if tokenization == "ptb":
    java_tools.require_java("PTB tokenization")
  if meteor:
    java_tools.require_java("METEOR")


def normalize_caption(text: str) -> str:
  """The offline tokenization (module docstring); tokens joined by one space."""
  text = _APOSTROPHES.sub("", text.lower())
  return " ".join(_NON_WORD.sub(" ", text).split())


def tokenize(predictions: Predictions, references: References, tokenization: str = "ptb"
             ) -> tuple[Tokenized, Tokenized]:
  """-> (gts, res) in the toolkit's scorer format: id -> tokenized references / [prediction].

  Keys keep the order of `predictions`.
  """
  if set(predictions) != set(references):
    missing = set(references) ^ set(predictions)
    raise ValueError(f"predictions and references differ on {len(missing)} ids, e.g. "
                     f"{sorted(map(str, missing))[:3]}")
  if not predictions:
    raise ValueError("no captions to score")
  for key in predictions:
    refs = references[key]
    if isinstance(refs, str) or not refs:
      raise ValueError(f"references[{key!r}] must be a non-empty list of strings")
  check_available(tokenization, meteor=False)
  refs = {key: list(references[key]) for key in predictions}
  preds = {key: [predictions[key]] for key in predictions}
  if tokenization == "ptb":
    return java_tools.ptb_tokenize(refs), java_tools.ptb_tokenize(preds)
  normalize = lambda captions: {k: [normalize_caption(c) for c in v] for k, v in captions.items()}
  return normalize(refs), normalize(preds)


def scores_of_tokenized(gts: Tokenized, res: Tokenized, meteor: bool = True) -> dict[str, float]:
  """The toolkit's scores of tokenized text, under its names (Bleu_1..4, METEOR, ROUGE_L, CIDEr)."""
  bleu_scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
  scores = {f"Bleu_{n}": float(s) for n, s in enumerate(bleu_scores, start=1)}
  if meteor:
    scores["METEOR"], _ = java_tools.meteor_score(gts, res)
  scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
  scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
  return scores


def exact_match_of_tokenized(gts: Tokenized, res: Tokenized) -> float:
  """Fraction of ids whose tokenized prediction equals one of its tokenized references."""
  hits = [res[key][0] in gts[key] for key in res]
  return sum(hits) / len(hits)


def caption_scores(predictions: Predictions, references: References, *,
                   tokenization: str = "ptb", meteor: bool = True,
                   exact_match: bool = False) -> dict[str, float]:
  """Bleu_1..4, METEOR (unless `meteor=False`), ROUGE_L, CIDEr (+ 'exact_match'), one tokenization."""
  check_available(tokenization, meteor)
  gts, res = tokenize(predictions, references, tokenization)
  scores = scores_of_tokenized(gts, res, meteor=meteor)
  if exact_match:
    scores["exact_match"] = exact_match_of_tokenized(gts, res)
  return scores


def cider(predictions: Predictions, references: References, tokenization: str = "ptb") -> float:
  """Corpus CIDEr-D (toolkit scale, e.g. 1.23)."""
  gts, res = tokenize(predictions, references, tokenization)
  return float(Cider().compute_score(gts, res)[0])


def bleu(predictions: Predictions, references: References, tokenization: str = "ptb"
         ) -> list[float]:
  """Corpus BLEU-1..4, each in [0, 1]."""
  gts, res = tokenize(predictions, references, tokenization)
  return [float(s) for s in Bleu(4).compute_score(gts, res, verbose=0)[0]]


def rouge_l(predictions: Predictions, references: References, tokenization: str = "ptb") -> float:
  """Mean per-id ROUGE-L (beta 1.2), in [0, 1]."""
  gts, res = tokenize(predictions, references, tokenization)
  return float(Rouge().compute_score(gts, res)[0])


def meteor(predictions: Predictions, references: References, tokenization: str = "ptb") -> float:
  """Corpus METEOR 1.5, in [0, 1]; the first call in a process starts the JVM (about 10 s)."""
  java_tools.require_java("METEOR")
  gts, res = tokenize(predictions, references, tokenization)
  return java_tools.meteor_score(gts, res)[0]


def exact_match(predictions: Predictions, references: References, tokenization: str = "ptb"
                ) -> float:
  """Fraction of ids whose tokenized prediction equals one of its tokenized references."""
  return exact_match_of_tokenized(*tokenize(predictions, references, tokenization))
