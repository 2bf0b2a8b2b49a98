"""CFG parallel: the prompt's and the negative prompt's forward on different ranks, one exchange per step.

Each rank of a cfg group runs a batch of 1 (cfg rank 0 the prompt, rank 1 the negative prompt) and all-gathers
the two noise predictions, so every rank holds [cond, uncond] and runs the same guidance combine and solver
update: the latents stay identical on every rank without a broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from wan_triton.model.engine import Engine


@dataclass(frozen=True)
class CfgParallel:
    group: dist.ProcessGroup
    index: int  # 0: prompt, 1: negative prompt

    def noise_pred(self, expert: Engine, model_input: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor):
        """model_input: [1, C_in, T, h, w]; t: the step's timestep, a scalar or one per latent frame [T]; embeds:
        [2, text_len, text_dim] -> noise_pred [2, C, T, h, w]."""
        mine = embeds[self.index : self.index + 1]
        timestep = t.expand(1, *t.shape)
        local = expert.run({"hidden_states": model_input, "timestep": timestep, "encoder_hidden_states": mine})[
            "noise_pred"
        ].contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts)
