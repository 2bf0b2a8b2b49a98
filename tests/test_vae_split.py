"""The VAE decode split over ranks by width (gloo, several processes) gives one process's frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from wan_triton.checkpoint import Checkpoint
from wan_triton.video import to_uint8_frames

# 3 latent frames (the causal time cache carries across them) of 4 x 8 latents: 2 columns a rank at 4 ranks.
LATENT_SHAPE = (3, 4, 8)


def _split_decode(rank: int, checkpoint: Path, latents: torch.Tensor) -> np.ndarray:
    import torch.distributed as dist

    from wan_triton.parallel.vae_split import split_decode_fn, split_vae_decoder

    vae = split_vae_decoder(Checkpoint.open(checkpoint).load_vae(torch.float32, "cpu"), dist.group.WORLD)
    with torch.inference_mode():
        return split_decode_fn(vae, dist.group.WORLD)(latents).numpy()  # numpy: tensors die with the process


@pytest.fixture(scope="module")
def vae_and_latents(tiny4_checkpoint):
    vae = Checkpoint.open(tiny4_checkpoint).load_vae(torch.float32, "cpu")
    latents = torch.randn(1, vae.config.z_dim, *LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = vae.decode(latents, return_dict=False)[0]
    return vae, latents, whole


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("ranks", [2, 4])
def test_split_decode_matches_one_process(tiny4_checkpoint, vae_and_latents, ranks):
    from wan_triton.parallel.world import run_world

    _, latents, whole = vae_and_latents
    for video in run_world(ranks, _split_decode, (tiny4_checkpoint, latents)):
        video = torch.from_numpy(video)
        assert video.shape == whole.shape
        # Summation order differs (keys gathered in rank order, convolutions over other tensor sizes): fp32 noise.
        assert _rel_l2(video, whole) < 1e-5
        assert np.abs(to_uint8_frames(video).astype(int) - to_uint8_frames(whole).astype(int)).max() <= 1


def test_strips_decoded_alone_do_not_match(vae_and_latents):
    # What the halos and the gathered attention are for: strips decoded independently differ at their seams
    # and everywhere the mid-block attention reaches (so the test above can tell a split from a correct one).
    vae, latents, whole = vae_and_latents
    with torch.inference_mode():
        alone = torch.cat([vae.decode(s, return_dict=False)[0] for s in latents.chunk(2, dim=-1)], dim=-1)
    assert _rel_l2(alone, whole) > 1e-2


def test_width_must_split(tiny4_checkpoint):
    from wan_triton.parallel.world import run_world

    latents = torch.zeros(1, 16, 1, 4, 6)
    with pytest.raises(RuntimeError, match="latent width 6 does not split over 4 ranks"):
        run_world(4, _split_decode, (tiny4_checkpoint, latents))
