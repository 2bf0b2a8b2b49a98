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
    assert len(families) == 6 and len(metrics) == 1 + len(metrics_module.OUTCOMES) + 4
    stage.close()
    assert all(ref() is None for ref in metrics + families)
    stage.request_done(0.1, "success")
    stage.step_done()
    stage.close()
    assert calls.total == 0
