"""The custom metrics' thread rule (wan_triton.serving.metrics): no two metric calls of one stub process overlap.

Triton 2.51's `Metric` calls are not thread-safe (the module docstring says how the server died of it); the fake
below fails a call that starts while another is still inside, as the real one would corrupt its shared memory.
"""

from __future__ import annotations

import threading
import time
import types

from wan_triton.serving import metrics as metrics_module
from wan_triton.serving.metrics import StageMetrics


class _Calls:
    """Counts metric calls in flight across every fake metric of the process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inside = 0
        self.overlaps = 0
        self.total = 0

    def enter(self) -> None:
        with self.lock:
            self.inside += 1
            self.total += 1
            if self.inside > 1:
                self.overlaps += 1
        time.sleep(0.0005)  # the real call waits for the server here, without the GIL
        with self.lock:
            self.inside -= 1


def _fake_pb(calls: _Calls):
    class Metric:
        def __init__(self, labels, buckets=None) -> None:
            self.labels = labels

        def increment(self, value) -> None:
            calls.enter()

        def set(self, value) -> None:
            calls.enter()

        def observe(self, value) -> None:
            calls.enter()

    class MetricFamily:
        COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

        def __init__(self, name, description, kind) -> None:
            self.name = name

        def Metric(self, labels, buckets=None):  # noqa: N802 - the Python backend's name
            return Metric(labels, buckets)

    return types.SimpleNamespace(MetricFamily=MetricFamily)


def _hammer(stage_metrics: list[StageMetrics], num_threads: int = 8, calls_each: int = 40) -> None:
    def work(index: int) -> None:
        m = stage_metrics[index % len(stage_metrics)]
        for i in range(calls_each):
            m.request_done(0.1, "success")
            m.step_done(2)
            m.batched(3)
            m.denoised(4, 0.5)
            m.device_memory_peak(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(num_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_metric_calls_from_many_threads_never_overlap():
    calls = _Calls()
    pb = _fake_pb(calls)
    # Two StageMetrics in one process, used at once: the lock is the process's, not one object's.
    _hammer([StageMetrics(pb, "wan_t2v", "scheduler"), StageMetrics(pb, "wan_t2v", "stream")])
    assert calls.total == 8 * 40 * 6 - 4 * 40 * 3  # the stream stage has no rate, batch or step metrics
    assert calls.overlaps == 0


def test_the_fake_sees_overlaps_without_the_lock(monkeypatch):
    """The check above can fail: with the lock taken away, the same threads do overlap."""

    class NoLock:
        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            return None

    monkeypatch.setattr(metrics_module, "_METRIC_CALLS", NoLock())
    calls = _Calls()
    _hammer([StageMetrics(_fake_pb(calls), "wan_t2v", "scheduler")])
    assert calls.overlaps > 0
