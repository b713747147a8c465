"""The two parts of the COCO caption toolkit (pycocoevalcap 1.2) that run in Java.

- PTB tokenization: the toolkit's `PTBTokenizer`, i.e. `edu.stanford.nlp.process.PTBTokenizer` of the
  stanford-corenlp-3.4.1 jar with `-preserveLines -lowerCase`, then the toolkit's punctuation tokens
  dropped. One short JVM per call (about 0.3 s). The toolkit writes its input file beside the jar:
  pycocoevalcap's folder must be writable (a virtualenv's is).
- METEOR 1.5: the toolkit's `Meteor`, `meteor-1.5.jar - - -stdio -l en -norm` with a 2 GB heap,
  modules exact, stem, synonym (WordNet, inside the jar) and paraphrase (`meteor/data/paraphrase-en.gz`,
  shipped in the pip package). Loading the paraphrase table takes about 10 s, so one JVM is started on
  first use and kept for the life of the process (`meteor_scorer`); `close_meteor` ends it.

Everything both need is inside the pip package; nothing is fetched at run time (SPICE, which this
project does not report, would download Stanford CoreNLP models and cannot run offline).

No `java` on PATH is an error (`JavaNotFound`) naming the package to install: the numbers of the
toolkit cannot be had without it. Callers that accept other numbers say so explicitly
(`captioning.caption_scores(..., tokenization="offline", meteor=False)`).
"""
import atexit
from collections.abc import Hashable, Mapping, Sequence
import shutil
import threading

from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

INSTALL_HINT = ("install a Java runtime (Debian/Ubuntu: `sudo apt-get install default-jre-headless`; "
                "scripts/test.sh does this where `java` is missing)")

# The toolkit writes all captions to one file, one per line, and reads one tokenized line back per
# caption; it replaces "\n" with a space first. Java also ends a line at these characters, which would
# shift every later caption onto the wrong id, so they become spaces too (as whitespace they separate
# tokens exactly as a space does).
_LINE_BREAKS = str.maketrans({c: " " for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"})


class JavaNotFound(RuntimeError):
  """No `java` executable on PATH."""


def require_java(what: str) -> None:
  if shutil.which("java") is None:
    raise JavaNotFound(
        f"{what} runs a jar of the COCO caption toolkit (pycocoevalcap) with `java`, and no `java` "
        f"is on PATH: {INSTALL_HINT}. To score without Java, with numbers that are NOT the "
        "toolkit's, ask for it explicitly: tokenization='offline', meteor=False "
        "(evaluation: PIXELLLM_CAPTION_METRICS=offline).")


def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
  """id -> captions, tokenized by the toolkit's PTBTokenizer: id -> tokenized captions (same order).

  Tokens are lower-case and joined by one space, e.g. "A man's T-shirt." -> "a man 's t-shirt".
  """
  require_java("PTB tokenization")
  toolkit_input = {key: [{"caption": c.translate(_LINE_BREAKS)} for c in texts]
                   for key, texts in captions.items()}
  if not toolkit_input:
    return {}
  tokenized = PTBTokenizer().tokenize(toolkit_input)
  # The toolkit pairs output lines with ids by position; a lost or extra line shows up as a count
  # that differs (the last id comes up short or missing).
  for key, texts in captions.items():
    if len(tokenized.get(key, ())) != len(texts):
      raise RuntimeError(f"PTB tokenization returned {len(tokenized.get(key, ()))} captions for id "
                         f"{key!r}, which has {len(texts)}")
  return tokenized


_meteor: Meteor | None = None
_meteor_lock = threading.Lock()


def meteor_scorer() -> Meteor:
  """The process's METEOR JVM, started on first use (about 10 s) and restarted if it has died."""
  global _meteor
  with _meteor_lock:
    if _meteor is not None and _meteor.meteor_p.poll() is not None:
      _discard(_meteor)
      _meteor = None
    if _meteor is None:
      require_java("METEOR")
      _meteor = Meteor()
    return _meteor


def meteor_score(gts: dict[Hashable, list[str]], res: dict[Hashable, list[str]]
                 ) -> tuple[float, list[float]]:
  """The toolkit's `Meteor().compute_score(gts, res)` on the kept JVM: (corpus score, per id).

  The corpus score comes from the summed statistics of all ids (not the mean of the per-id scores).
  """
  scorer = meteor_scorer()
  try:
    score, scores = scorer.compute_score(gts, res)
  except (ValueError, OSError) as e:  # the JVM died: an empty line, or a closed pipe
    global _meteor
    with _meteor_lock:
      error = _discard(scorer)
      if _meteor is scorer:
        _meteor = None
    raise RuntimeError(f"the METEOR jar stopped answering ({e!r}); its stderr: {error}") from e
  return float(score), [float(s) for s in scores]


def close_meteor() -> None:
  """Ends the kept METEOR JVM (its heap is up to 2 GB); the next METEOR call starts a new one."""
  global _meteor
  with _meteor_lock:
    if _meteor is not None:
      _discard(_meteor)
      _meteor = None


def _discard(scorer: Meteor) -> str:
  """Kills a scorer's JVM -> the end of its stderr. Releases the toolkit's lock if a failed call
  left it held: the toolkit's `__del__` takes that lock and would otherwise hang."""
  if scorer.lock.locked():
    scorer.lock.release()
  process = scorer.meteor_p
  process.kill()
  process.wait()
  for pipe in (process.stdin, process.stdout):
    try:
      pipe.close()
    except OSError:  # a broken pipe's unflushed bytes
      pass
  error = process.stderr.read().decode(errors="replace")[-2000:]
  process.stderr.close()
  return error


atexit.register(close_meteor)
