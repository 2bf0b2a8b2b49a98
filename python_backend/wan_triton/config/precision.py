"""The torch dtype of each precision a deployment may name."""

import torch

# `fp8` (denoiser, torch engine on Hopper only; wan_triton.kernels.fp8) is a bf16 module whose block linear layers and
# self-attention run in e4m3: its activations, inputs and outputs are bf16.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "fp8": torch.bfloat16}
