"""Prometheus metrics of the pipeline, served on Triton's metrics port beside Triton's own `nv_*` metrics.

Each ensemble step (and the stream model) runs in its own stub process and registers the families it uses through
the Python backend's custom-metrics API; Triton merges them into one /metrics page. Names:

- `wan_stage_seconds{model, stage}`: histogram of each step's time per request (text_encoder, scheduler = the
  denoising loop, vae_decoder, postprocess, preprocess; stream = a whole streamed request);
- `wan_requests_total{model, stage, outcome}`: requests per step by outcome (`success`, `invalid_arg`, `cancelled`,
  `deadline`, `error`); `stage="preprocess"` counts every request the server admitted;
- `wan_denoise_steps_per_second{model}`: the last request's denoising rate;
- `wan_denoise_steps_total{model}`: denoising steps run, per request (a batch of 3 adds 3 per step); a stopped
  request's steps count up to where it stopped;
- `wan_batch_size{model}`: histogram of how many requests each batched denoising loop ran together;
- `wan_device_memory_bytes{model, stage}`: peak device memory of the step's process during its last request;
- `wan_model_ready{model, stage}`: 1 once the step has loaded and run its warm-up, 0 while it unloads;
- `wan_queue_limit{model}`: the scheduler's queue limit (`serving.max_queue_size`); 0 when unbounded;
- `wan_worker_group_restarts_total{model, stage}`: worker groups of a parallel plan (scheduler) or split decode
  (vae_decoder) started again after a worker died or hung.

Queue length is Triton's own `nv_inference_pending_request_count{model=...}`.

Every metric call of a stub process goes through one lock: each `Metric` is wrapped in a `SerialMetric`. In Triton
2.51 a `Metric` call is not thread-safe: it writes the operation into shared memory owned by the `Metric` object
and swaps that block out on the next call, so two threads updating one metric at once can free the block the
server is about to read. The server then reads
garbage and dies (SIGSEGV in `ProcessMetricRequest` -> `Metric::LoadFromSharedMemory`, or a `std::bad_alloc` or
`boost::interprocess::lock_exception` abort). The stream model answers each request from its own thread, and those
threads update its metrics concurrently; `benchmarks/stream_stress.py` crashed the server within seconds without
the lock (`tools/triton_crash_stack.py` names the functions in such a crash stack).

The model's `finalize` releases every metric and family (`StageMetrics.close`). A `MetricFamily` that outlives it is
destroyed in the stub's own destructor, after the stub has torn down its shared memory and its link to the server,
and its destructor still clears each of its metrics through that shared memory: the stub then segfaults at unload
(`Metric::SaveToSharedMemory` <- `Metric::Clear` <- `MetricFamily::~MetricFamily` <- `Stub::~Stub`).
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger(__name__)

# One per stub process: see the module docstring.
_METRIC_CALLS = threading.Lock()


class SerialMetric:
    """A Python-backend `Metric` whose every call holds the process's metric lock (see the module docstring)."""

    def __init__(self, metric) -> None:
        self._metric = metric

    def increment(self, value: float) -> None:
        with _METRIC_CALLS:
            if self._metric is not None:
                self._metric.increment(value)

    def set(self, value: float) -> None:
        with _METRIC_CALLS:
            if self._metric is not None:
                self._metric.set(value)

    def observe(self, value: float) -> None:
        with _METRIC_CALLS:
            if self._metric is not None:
                self._metric.observe(value)

    def release(self) -> None:
        """Drop the `Metric` (the caller holds the lock); later calls do nothing."""
        self._metric = None


# Seconds: from a tiny CPU request (milliseconds) to a 720p A14B denoising loop (about 15 minutes).
BATCH_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
STAGE_BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200]
OUTCOMES = ("success", "invalid_arg", "cancelled", "deadline", "error")


class StageMetrics:
    """The metrics one step reports. Every call is a no-op where custom metrics are unavailable."""

    def __init__(self, pb, model: str, stage: str) -> None:
        self.enabled = hasattr(pb, "MetricFamily")
        if not self.enabled:
            logger.warning("custom metrics unavailable in this Python backend; %s reports none", stage)
            return
        labels = {"model": model, "stage": stage}
        self._metrics: list[SerialMetric] = []
        family = pb.MetricFamily
        # The families are kept: a Metric is unusable once its MetricFamily object is garbage-collected.
        self.families = {
            "seconds": family(
                name="wan_stage_seconds", description="Time of one step per request", kind=family.HISTOGRAM
            ),
            "requests": family(
                name="wan_requests_total", description="Requests by step and outcome", kind=family.COUNTER
            ),
            "memory": family(
                name="wan_device_memory_bytes",
                description="Peak device memory of the step's last request",
                kind=family.GAUGE,
            ),
        }
        self.families["ready"] = family(
            name="wan_model_ready", description="1 once the step has loaded and warmed up", kind=family.GAUGE
        )
        self.families["restarts"] = family(
            name="wan_worker_group_restarts_total",
            description="Worker groups started again after a worker died or hung",
            kind=family.COUNTER,
        )
        self.seconds = self._metric("seconds", labels, buckets=STAGE_BUCKETS)
        self.outcomes = {o: self._metric("requests", {**labels, "outcome": o}) for o in OUTCOMES}
        self.device_memory = self._metric("memory", labels)
        self.ready = self._metric("ready", labels)
        self.restarts = self._metric("restarts", labels)
        self._restarts_counted = 0
        self.queue_limit = None
        self.steps_per_second = None
        self.batch_size = None
        self.steps = None
        if stage == "scheduler":
            self.families["rate"] = family(
                name="wan_denoise_steps_per_second",
                description="Denoising steps per second of the last request",
                kind=family.GAUGE,
            )
            self.steps_per_second = self._metric("rate", {"model": model})
            self.families["batch"] = family(
                name="wan_batch_size",
                description="Requests denoised together in one batched loop",
                kind=family.HISTOGRAM,
            )
            self.batch_size = self._metric("batch", {"model": model}, buckets=BATCH_BUCKETS)
            self.families["steps"] = family(
                name="wan_denoise_steps_total", description="Denoising steps run, per request", kind=family.COUNTER
            )
            self.steps = self._metric("steps", {"model": model})
            self.families["queue_limit"] = family(
                name="wan_queue_limit", description="Requests that may wait for the denoising loop", kind=family.GAUGE
            )
            self.queue_limit = self._metric("queue_limit", {"model": model})

    def _metric(self, family: str, labels: dict[str, str], **options) -> SerialMetric:
        metric = SerialMetric(self.families[family].Metric(labels=labels, **options))
        self._metrics.append(metric)
        return metric

    def close(self) -> None:
        """Release the metrics, then their families, while the stub still runs: from the model's `finalize`
        (module docstring). Later calls of every method do nothing."""
        if not self.enabled:
            return
        with _METRIC_CALLS:
            self.enabled = False
            for metric in self._metrics:
                metric.release()
            self._metrics.clear()
            # The last references: each family's destructor clears its metrics and deletes it in the server now.
            self.families.clear()

    def request_done(self, seconds: float, outcome: str) -> None:
        if self.enabled:
            self.seconds.observe(seconds)
            self.outcomes[outcome].increment(1)

    def denoised(self, num_steps: int, seconds: float) -> None:
        if self.enabled and self.steps_per_second is not None and seconds > 0:
            self.steps_per_second.set(num_steps / seconds)

    def step_done(self, num_requests: int = 1) -> None:
        if self.enabled and self.steps is not None:
            self.steps.increment(num_requests)

    def batched(self, num_requests: int) -> None:
        if self.enabled and self.batch_size is not None:
            self.batch_size.observe(num_requests)

    def device_memory_peak(self, num_bytes: int) -> None:
        if self.enabled:
            self.device_memory.set(num_bytes)

    def loaded(self, ready: bool) -> None:
        if self.enabled:
            self.ready.set(1 if ready else 0)

    def queue_limit_is(self, max_queue_size: int | None) -> None:
        """The scheduler's queue limit; an unbounded queue leaves the gauge at 0 (alert rules skip it)."""
        if self.enabled and self.queue_limit is not None and max_queue_size is not None:
            self.queue_limit.set(max_queue_size)

    def worker_group_restarts(self, total: int) -> None:
        """`total`: how often the step's worker group has been restarted since it loaded (it only grows); the
        counter is brought up to it."""
        if self.enabled and total > self._restarts_counted:
            self.restarts.increment(total - self._restarts_counted)
            self._restarts_counted = total
