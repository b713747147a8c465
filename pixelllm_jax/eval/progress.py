"""A progress bar over the records of an evaluation split (process 0 only).

The evaluation pipeline reads a split's records in order (`data/pipeline.eval_batches`),
so records read / len(split) is the progress; the number of batches is not known in
advance (an image gives as many rows as its slots need). tqdm draws the bar when it is
installed; without it a line is printed every tenth of the split.
"""
import contextlib
import sys
import time
from typing import Any, Iterator

try:
  import tqdm
except ImportError:  # an optional nicety: the job runs without it
  tqdm = None


class _Lines:
  """tqdm's `update` / `close` as a printed line per tenth of the total."""

  def __init__(self, total: int, desc: str):
    self.total, self.desc, self.n, self.start = total, desc, 0, time.perf_counter()
    self._every = max(1, total // 10)

  def update(self, n: int = 1) -> None:
    self.n += n
    if self.n % self._every == 0 or self.n == self.total:
      print(f"{self.desc}: {self.n}/{self.total} records, "
            f"{time.perf_counter() - self.start:.1f} s", flush=True)

  def close(self) -> None:
    pass


class _Counted:
  """A random-access data source that reports each record read to `bar`."""

  def __init__(self, source: Any, bar: Any):
    self._source, self._bar = source, bar

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Any:
    record = self._source[index]
    self._bar.update(1)
    return record


@contextlib.contextmanager
def tracked(source: Any, desc: str, show: bool) -> Iterator[Any]:
  """`source`, counting its records on a bar labelled `desc` when `show`."""
  if not show:
    yield source
    return
  bar = (tqdm.tqdm(total=len(source), desc=desc, unit="rec", file=sys.stderr, mininterval=1.0)
         if tqdm is not None else _Lines(len(source), desc))
  try:
    yield _Counted(source, bar)
  finally:
    bar.close()
