"""Shared code of the benchmarks (benchmarks/*.py); each module imports only what it needs, so a benchmark that
talks to a server does not load torch.

- `records`: the head of every JSON result (device, commit, command line, timestamp) and writing it;
- `timing`: CUDA-event and wall-clock timing loops with warm-up, the slowest rank of a group, the GEMM rate;
- `memory`: device memory held and its peak, the whole GPU's use sampled from nvidia-smi;
- `metrics`: a server's /metrics text (batch histogram, device memory) and Triton's per-model statistics;
- `load`: requests from concurrent gRPC clients;
- `deployments`: deployment copies with the setting under test, rendered into model repositories;
- `experts`: A14B experts with random weights on the device, request sizes, FLOP, guided steps;
- `fake_world`: rank 0 of a plan alone on one device (fake process group, value-preserving collectives);
- `plans`: measured plan variants and the model tables built from them;
- `perf_model`: the analytic step-time model of parallel plans;
- `profiling`: kernel time by kernel and by kind from torch.profiler;
- `perf_analyzer`: Triton's perf_analyzer binary and the libraries it needs.
"""
