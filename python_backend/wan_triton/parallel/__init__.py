"""Multi-GPU primitives of the denoiser: CFG parallel x Ulysses sequence parallel x tensor parallel.

`process_groups` (the torch.distributed groups of a plan), `cfg` (the classifier-free-guidance exchange), `ulysses`
(all-to-all heads <-> sequence), `tensor_parallel` (sharded Linear / RMSNorm layers), `sharding` (a
WanTransformer3DModel sharded in place for one rank, and its attention processor), `tp_shards` (build-time
tensor-parallel weight files), `vae_split` (the VAE decode split by frame width). The plan itself is configuration
(`config.plan`); the processes that run it are `workers`.
"""
