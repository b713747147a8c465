"""Trace math: utterance boxes / time-averaged points, utterance -> token matching."""
import numpy as np
import pytest

from pixelllm_jax.data import trace


def _points(*xyt):
  return [{"x": x, "y": y, "t": t} for x, y, t in xyt]


def _utt(start, end, text="w"):
  return {"utterance": text, "start_time": start, "end_time": end}


def test_trace_array_concatenates_segments_and_sorts_by_time():
  traces = [_points((0.5, 0.5, 2.0), (0.6, 0.6, 3.0)), _points((0.1, 0.1, 0.0), (0.2, 0.2, 1.0))]
  got = trace.trace_array(traces)
  assert got.dtype == np.float32 and got.shape == (4, 3)
  np.testing.assert_allclose(got[:, 2], [0, 1, 2, 3])
  np.testing.assert_allclose(got[:, 0], [0.1, 0.2, 0.5, 0.6], rtol=1e-6)


def test_trace_array_errors():
  with pytest.raises(ValueError, match="no points"):
    trace.trace_array([[], []])
  with pytest.raises(ValueError, match="segment 0 point 1"):
    trace.trace_array([[{"x": 0, "y": 0, "t": 0}, {"x": 0, "t": 1}]])


def test_linear_trace_box_and_time_average():
  # x = t / 4, y = 0.5 - t / 8 over t in [0, 4].
  traces = [_points((0.0, 0.5, 0.0), (1.0, 0.0, 4.0))]
  boxes, points = trace.utterance_boxes_and_points(traces, [_utt(0, 2), _utt(2, 4)])
  assert boxes.dtype == np.float32 and boxes.shape == (2, 4) and points.shape == (2, 2)
  np.testing.assert_allclose(boxes, [[0.0, 0.25, 0.5, 0.5], [0.5, 0.0, 1.0, 0.25]], atol=1e-6)
  np.testing.assert_allclose(points, [[0.25, 0.375], [0.75, 0.125]], atol=1e-6)


def test_time_average_is_trapezoid_integral_not_mean_of_trace_points():
  # Fast move then a long dwell: the trace points' mean is 0.5, the time average is not.
  traces = [_points((0.0, 0.0, 0.0), (0.9, 0.0, 0.1), (0.9, 0.0, 3.0))]
  _, points = trace.utterance_boxes_and_points(traces, [_utt(0.0, 3.0)])
  samples = np.clip(trace.interpolate(trace.trace_array(traces), np.linspace(0, 3, 16)), 0, 1)
  dt = 3.0 / 15
  expected = ((samples[1:, 0] + samples[:-1, 0]) / 2 * dt).sum() / 3.0
  assert points[0, 0] == pytest.approx(expected, abs=1e-6)
  assert points[0, 0] > 0.8  # dominated by the dwell


def test_zero_duration_uses_the_sample_value():
  traces = [_points((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))]
  boxes, points = trace.utterance_boxes_and_points(traces, [_utt(0.25, 0.25)])
  np.testing.assert_allclose(points, [[0.25, 0.25]], atol=1e-6)
  np.testing.assert_allclose(boxes, [[0.25, 0.25, 0.25, 0.25]], atol=1e-6)


def test_linear_extrapolation_outside_the_trace_then_clipping():
  # Trace covers t in [1, 2] with x = 0.2 t; y constant.
  traces = [_points((0.2, 0.3, 1.0), (0.4, 0.3, 2.0))]
  boxes, _ = trace.utterance_boxes_and_points(traces, [_utt(0.0, 1.0), _utt(2.0, 10.0)])
  np.testing.assert_allclose(boxes[0], [0.0, 0.3, 0.2, 0.3], atol=1e-6)   # extrapolated to x(0) = 0
  np.testing.assert_allclose(boxes[1], [0.4, 0.3, 1.0, 0.3], atol=1e-6)   # x(10) = 2 clipped to 1
  np.testing.assert_allclose(trace.interpolate(trace.trace_array(traces), [-1.0, 3.0])[:, 0],
                             [-0.2, 0.6], atol=1e-9)


def test_duplicate_times_are_averaged_and_single_time_is_constant():
  dup = trace.trace_array([_points((0.0, 0.0, 0.0), (0.2, 0.4, 1.0), (0.4, 0.0, 1.0))])
  np.testing.assert_allclose(trace.interpolate(dup, [1.0, 0.5]), [[0.3, 0.2], [0.15, 0.1]], atol=1e-7)
  const = trace.trace_array([_points((0.3, 0.7, 5.0))])
  np.testing.assert_allclose(trace.interpolate(const, [0.0, 9.0]), [[0.3, 0.7]] * 2, atol=1e-7)


def test_coordinates_are_clipped_to_unit_square():
  traces = [_points((-0.1, 1.2, 0.0), (-0.1, 1.2, 1.0))]
  boxes, points = trace.utterance_boxes_and_points(traces, [_utt(0, 1)])
  np.testing.assert_allclose(boxes, [[0, 1, 0, 1]])
  np.testing.assert_allclose(points, [[0, 1]])


def test_bad_utterance_times_are_errors():
  traces = [_points((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))]
  with pytest.raises(ValueError, match="utterance 1 has bad times"):
    trace.utterance_boxes_and_points(traces, [_utt(0, 1), _utt(1.0, 0.5)])
  with pytest.raises(ValueError, match="utterance 0 lacks"):
    trace.utterance_boxes_and_points(traces, [{"utterance": "a"}])


def test_assign_equal_counts_map_one_to_one():
  np.testing.assert_array_equal(trace.assign_utterances_to_tokens(5, [True] * 5), [0, 1, 2, 3, 4])


def test_assign_two_tokens_per_utterance_map_in_pairs():
  np.testing.assert_array_equal(trace.assign_utterances_to_tokens(6, [True] * 3), [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(trace.assign_utterances_to_tokens(8, [True] * 4),
                                [0, 0, 1, 1, 2, 2, 3, 3])


def test_assign_skips_invalid_utterances_and_indexes_the_full_list():
  got = trace.assign_utterances_to_tokens(3, [False, True, False, True, True])
  np.testing.assert_array_equal(got, [1, 3, 4])


def test_assign_fewer_tokens_than_utterances_spans_first_to_last():
  np.testing.assert_array_equal(trace.assign_utterances_to_tokens(2, [True] * 5), [0, 4])
  np.testing.assert_array_equal(trace.assign_utterances_to_tokens(3, [True] * 5), [0, 2, 4])
  np.testing.assert_array_equal(trace.assign_utterances_to_tokens(1, [True] * 5), [0])


def test_assign_is_monotone_and_covers_all_utterances_when_tokens_outnumber_them():
  rng = np.random.default_rng(0)
  for _ in range(50):
    num_utts, num_tokens = int(rng.integers(1, 20)), int(rng.integers(1, 60))
    valid = rng.random(num_utts) < 0.8
    got = trace.assign_utterances_to_tokens(num_tokens, valid)
    assert got.dtype == np.int32 and got.shape == (num_tokens,)
    if not valid.any():
      assert np.all(got == -1)
      continue
    assert np.all(np.diff(got) >= 0)
    assert np.all(valid[got])
    assert got[0] == np.flatnonzero(valid)[0] and got[-1] == np.flatnonzero(valid)[-1]
    if num_tokens >= valid.sum():
      assert set(got) == set(np.flatnonzero(valid))


def test_assign_degenerate_inputs():
  assert trace.assign_utterances_to_tokens(0, [True]).shape == (0,)
  np.testing.assert_array_equal(trace.assign_utterances_to_tokens(3, [False, False]), [-1, -1, -1])
  np.testing.assert_array_equal(trace.assign_utterances_to_tokens(3, []), [-1, -1, -1])
  with pytest.raises(ValueError):
    trace.assign_utterances_to_tokens(-1, [True])
