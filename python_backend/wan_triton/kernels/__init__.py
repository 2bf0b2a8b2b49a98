"""GPU kernels of the denoiser: attention backends and the FFN's fused GELU."""
