"""The parallel plan of the denoiser: cfg x ulysses x tp ranks, validated against the checkpoint's config.

Rank layout (tp innermost, so the ranks that all-reduce every layer are neighbours, e.g. NVLink peers):

    rank = cfg_index * (ulysses * tp) + ulysses_index * tp + tp_index

- cfg group: the ranks with the same (ulysses_index, tp_index); cfg rank 0 runs the prompt, rank 1 the negative.
- ulysses group: the same (cfg_index, tp_index); ulysses rank i holds the i-th contiguous slice of the tokens.
- tp group: the same (cfg_index, ulysses_index); tp rank j holds heads [j*H/tp, (j+1)*H/tp) and FFN columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class PlanError(ValueError):
    """The plan cannot run this checkpoint (or this world size)."""


class ParallelPlan(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cfg: int = Field(default=1, ge=1, le=2, description="1, or 2: prompt and negative prompt on different ranks")
    ulysses: int = Field(default=1, ge=1, description="sequence-parallel degree (all-to-all around attention)")
    tp: int = Field(default=1, ge=1, description="tensor-parallel degree (heads and FFN columns)")

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses * self.tp

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    def __str__(self) -> str:
        return f"cfg{self.cfg}xulysses{self.ulysses}xtp{self.tp}"

    def check_world_size(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise PlanError(f"plan {self} needs world size cfg x ulysses x tp = {self.world_size}, got {world_size}")

    def check_transformer(self, config: dict[str, Any], ulysses_head_groups: int = 1) -> None:
        """Refuse a plan the expert's config cannot be split by (config: the transformer's config.json).
        `ulysses_head_groups`: the groups each rank's heads are exchanged in (the deployment's setting)."""
        heads = int(config["num_attention_heads"])
        ffn_dim = int(config["ffn_dim"])
        problems = []
        if heads % (self.ulysses * self.tp):
            problems.append(f"num_attention_heads {heads} is not divisible by ulysses x tp = {self.ulysses * self.tp}")
        elif ulysses_head_groups > 1 and (heads // (self.ulysses * self.tp)) % ulysses_head_groups:
            local = heads // (self.ulysses * self.tp)
            problems.append(
                f"ulysses_head_groups {ulysses_head_groups} does not divide the {local} heads of a rank "
                f"(num_attention_heads {heads} / (ulysses x tp))"
            )
        if ffn_dim % self.tp:
            problems.append(f"ffn_dim {ffn_dim} is not divisible by tp = {self.tp}")
        if config.get("added_kv_proj_dim") is not None or config.get("image_dim") is not None:
            problems.append("image-conditioned (I2V) experts are not supported in parallel")
        if problems:
            raise PlanError(f"parallel plan {self} does not fit the checkpoint: " + "; ".join(problems))

    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world_size:
            raise PlanError(f"rank {rank} outside world size {self.world_size}")
        cfg_index, rest = divmod(rank, self.ulysses * self.tp)
        ulysses_index, tp_index = divmod(rest, self.tp)
        return RankCoords(cfg_index, ulysses_index, tp_index)

    def rank_of(self, coords: RankCoords) -> int:
        return (coords.cfg * self.ulysses + coords.ulysses) * self.tp + coords.tp

    def group_ranks(self) -> dict[str, list[list[int]]]:
        """Every group of each kind, as lists of global ranks in group-rank order."""
        c, u, t = self.cfg, self.ulysses, self.tp
        r = self.rank_of
        return {
            "cfg": [[r(RankCoords(i, ui, ti)) for i in range(c)] for ui in range(u) for ti in range(t)],
            "ulysses": [[r(RankCoords(ci, i, ti)) for i in range(u)] for ci in range(c) for ti in range(t)],
            "tp": [[r(RankCoords(ci, ui, i)) for i in range(t)] for ci in range(c) for ui in range(u)],
        }


@dataclass(frozen=True)
class RankCoords:
    cfg: int
    ulysses: int
    tp: int


def num_tokens(latent_frames: int, latent_height: int, latent_width: int, patch_size: tuple[int, int, int]) -> int:
    """Length of the transformer's token sequence for one video: (F / p_t) x (h / p_h) x (w / p_w)."""
    p_t, p_h, p_w = patch_size
    return (latent_frames // p_t) * (latent_height // p_h) * (latent_width // p_w)
