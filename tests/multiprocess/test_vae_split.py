"""The VAE decode split over ranks by width (gloo, several processes) gives one process's frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from checks import rel_l2
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.model.frames import to_uint8_frames

# 3 latent frames (the causal time cache carries across them) of 4 x 8 latents: 2 columns a rank at 4 ranks.
LATENT_SHAPE = (3, 4, 8)


def _split_decode(rank: int, checkpoint: Path, latents_list: list[torch.Tensor]) -> list[np.ndarray | None]:
    import torch.distributed as dist

    from wan_triton.parallel.vae_split import split_decode_fn, split_vae_decoder

    vae = split_vae_decoder(Checkpoint.open(checkpoint).load_vae(torch.float32, "cpu"), dist.group.WORLD)
    decode = split_decode_fn(vae, dist.group.WORLD)
    with torch.inference_mode():
        videos = [decode(latents) for latents in latents_list]
    return [None if v is None else v.numpy() for v in videos]  # numpy: tensors die with the process


@pytest.fixture(scope="module")
def vae_and_latents(tiny4_checkpoint):
    vae = Checkpoint.open(tiny4_checkpoint).load_vae(torch.float32, "cpu")
    latents = torch.randn(1, vae.config.z_dim, *LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = vae.decode(latents, return_dict=False)[0]
    return vae, latents, whole


@pytest.mark.parametrize("ranks", [2, 4])
def test_split_decode_matches_one_process(tiny4_checkpoint, vae_and_latents, ranks):
    from wan_triton.workers.world import run_world

    vae, latents, whole = vae_and_latents
    # Then a width of 6 latent columns: 3 per rank at 2 ranks, and not divisible at 4 (rank 0 decodes it whole).
    odd = latents[..., :6]
    with torch.inference_mode():
        odd_whole = vae.decode(odd, return_dict=False)[0]
    results = run_world(ranks, _split_decode, (tiny4_checkpoint, [latents, odd, latents]))
    assert all(video is None for rank_videos in results[1:] for video in rank_videos)  # rank 0 returns the video
    for video, expected in zip(results[0], [whole, odd_whole, whole], strict=True):
        video = torch.from_numpy(video)
        assert video.shape == expected.shape
        # Summation order differs (keys gathered in rank order, convolutions over other tensor sizes): fp32 noise.
        assert rel_l2(video, expected) < 1e-5
        assert np.abs(to_uint8_frames(video).astype(int) - to_uint8_frames(expected).astype(int)).max() <= 1


def test_strips_decoded_alone_do_not_match(vae_and_latents):
    # What the halos and the gathered attention are for: strips decoded independently differ at their seams
    # and everywhere the mid-block attention reaches (so the test above can tell a split from a correct one).
    vae, latents, whole = vae_and_latents
    with torch.inference_mode():
        alone = torch.cat([vae.decode(s, return_dict=False)[0] for s in latents.chunk(2, dim=-1)], dim=-1)
    assert rel_l2(alone, whole) > 1e-2


def test_vae_worker_group_serves_the_split_decode(tiny4_checkpoint, vae_and_latents):
    from wan_triton.components import build_vae_decoder
    from wan_triton.config.deployment import ComponentConfig

    _, latents, _ = vae_and_latents
    ckpt = Checkpoint.open(tiny4_checkpoint)
    single = build_vae_decoder(ckpt, ComponentConfig(engine="torch"), Path("/nonexistent"))
    group = build_vae_decoder(ckpt, ComponentConfig(engine="torch", split_width=2), Path("/nonexistent"))
    try:
        expected = single.frames(latents)
        assert np.abs(group.frames(latents).astype(int) - expected.astype(int)).max() <= 1
        assert group.healthy() and len(group.pids) == 2
    finally:
        group.close()
