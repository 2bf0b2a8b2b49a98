"""The custom metrics' thread rule (wan_triton.serving.metrics): no two metric calls of one stub process overlap.

Triton 2.51's `Metric` calls are not thread-safe (the module docstring says how the server died of it); the fake
metrics (tests/fakes/pb_utils.py) count a call that starts while another is still inside, where the real one would
corrupt its shared memory.
"""

from __future__ import annotations

import threading
import time
import weakref

from fakes import pb_utils
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
    pb = pb_utils.with_metrics(calls.enter)
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
    _hammer([StageMetrics(pb_utils.with_metrics(calls.enter), "wan_t2v", "scheduler")])
    assert calls.overlaps > 0


def test_close_releases_every_metric_and_family_and_later_calls_do_nothing():
    """A model's finalize closes its metrics: nothing of the Python backend's may outlive it into the stub's own
    destructor (the module docstring says how the stub crashed at unload)."""
    calls = _Calls()
    stage = StageMetrics(pb_utils.with_metrics(calls.enter), "wan_t2v", "scheduler")
    families = [weakref.ref(f) for f in stage.families.values()]
    metrics = [weakref.ref(m._metric) for m in stage._metrics]
    # seconds, requests, memory, ready, restarts; the scheduler's rate, batch, steps, queue_limit
    assert len(families) == 9 and len(metrics) == 1 + len(metrics_module.OUTCOMES) + 7
    stage.close()
    assert all(ref() is None for ref in metrics + families)
    stage.request_done(0.1, "success")
    stage.step_done()
    stage.close()
    assert calls.total == 0


class _Recorded:
    """A fake backend whose metrics keep their value: {(family name, sorted labels): value}."""

    def __init__(self) -> None:
        self.values: dict[tuple, float] = {}
        values = self.values

        class Metric:
            def __init__(self, key) -> None:
                self.key = key
                values[key] = 0.0

            def increment(self, value) -> None:
                values[self.key] += value

            def set(self, value) -> None:
                values[self.key] = value

            def observe(self, value) -> None:
                values[self.key] += 1

        class MetricFamily:
            COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

            def __init__(self, name, description, kind) -> None:
                self.name = name

            def Metric(self, labels, buckets=None):  # noqa: N802 - the Python backend's name
                return Metric((self.name, tuple(sorted(labels.items()))))

        self.MetricFamily = MetricFamily

    def value(self, name: str, **labels) -> float:
        return self.values[(name, tuple(sorted(labels.items())))]


def test_readiness_queue_limit_and_worker_group_restarts():
    pb = _Recorded()
    m = StageMetrics(pb, "wan_t2v", "scheduler")
    assert pb.value("wan_model_ready", model="wan_t2v", stage="scheduler") == 0
    m.loaded(True)
    assert pb.value("wan_model_ready", model="wan_t2v", stage="scheduler") == 1
    m.queue_limit_is(8)
    assert pb.value("wan_queue_limit", model="wan_t2v") == 8
    m.queue_limit_is(None)  # unbounded: left alone
    assert pb.value("wan_queue_limit", model="wan_t2v") == 8
    restarts = dict(name="wan_worker_group_restarts_total", model="wan_t2v", stage="scheduler")
    for total, expected in [(0, 0), (2, 2), (2, 2), (3, 3)]:  # the group's running total; the counter follows it
        m.worker_group_restarts(total)
        assert pb.value(**restarts) == expected
    m.loaded(False)
    assert pb.value("wan_model_ready", model="wan_t2v", stage="scheduler") == 0


def test_only_the_scheduler_reports_a_queue_limit():
    pb = _Recorded()
    StageMetrics(pb, "wan_t2v", "vae_decoder").queue_limit_is(8)
    assert not any(name == "wan_queue_limit" for name, _ in pb.values)
    assert pb.value("wan_worker_group_restarts_total", model="wan_t2v", stage="vae_decoder") == 0
