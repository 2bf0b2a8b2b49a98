"""Multi-GPU denoising: CFG parallel x Ulysses sequence parallel x tensor parallel, run by a worker group.

`plan` (the plan and its validation), `ulysses` (all-to-all heads <-> sequence), `tensor_parallel` (sharded
Linear / RMSNorm layers), `model` (sharding a WanTransformer3DModel in place and its attention processor),
`cfg` (the classifier-free-guidance exchange), `worker` / `group` (the worker processes and their supervisor),
`perf_model` (the analytic step-time model of the benchmark).
"""
