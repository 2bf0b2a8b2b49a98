"""The MP4 encoded chunk by chunk while the VAE decodes (deployment `video.encode_while_decoding`): the same frames
and the same bytes as decoding everything and then encoding, with the encode running while later chunks decode."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from factories import DEPLOYMENTS_DIR
from wan_build.tiny_model import make_tiny_checkpoint
from wan_triton.config.deployment import Deployment
from wan_triton.model import video as video_module
from wan_triton.model.checkpoint import Checkpoint
from wan_triton.model.vae import VaeDecoder, torch_vae_decode_chunks_fn, torch_vae_decode_fn
from wan_triton.model.video import BackgroundMp4Encoder, Mp4Encoder, encode_mp4

FPS = 16


def _frames(num_frames: int = 9, height: int = 32, width: int = 48, seed: int = 0) -> np.ndarray:
    # Smooth moving gradients with some noise: x264 has motion to search and detail to keep.
    t, y, x = np.mgrid[0:num_frames, 0:height, 0:width]
    base = np.stack([(x * 5 + t * 7) % 256, (y * 6 + t * 3) % 256, (x + y + t * 11) % 256], axis=-1)
    noise = np.random.default_rng(seed).integers(0, 24, size=base.shape)
    return ((base + noise) % 256).astype(np.uint8)


@pytest.mark.parametrize("preset", ["fast", "ultrafast"])
def test_chunks_give_the_bytes_of_one_encode(preset):
    frames = _frames()
    whole = encode_mp4(frames, FPS, preset, 17)
    # The decoder's chunking: the first latent frame gives 1 frame, every later one 4.
    for encoder in (Mp4Encoder(FPS, preset, 17), BackgroundMp4Encoder(FPS, preset, 17)):
        for start, stop in ((0, 1), (1, 5), (5, 9)):
            encoder.add(frames[start:stop])
        assert encoder.finish() == whole


def test_a_chunk_of_another_size_is_refused():
    encoder = Mp4Encoder(FPS)
    encoder.add(_frames(1))
    with pytest.raises(ValueError, match="frames are 32x64, but the video is 32x48"):
        encoder.add(_frames(1, width=64))
    encoder.close()


def test_background_errors_surface_at_finish():
    encoder = BackgroundMp4Encoder(FPS)
    encoder.add(_frames(1))
    encoder.add(_frames(2, width=64))  # returns at once; the worker thread refuses it
    encoder.add(_frames(2))
    with pytest.raises(ValueError, match="frames are 32x64, but the video is 32x48"):
        encoder.finish()
    with pytest.raises(ValueError, match="at least one frame"):
        Mp4Encoder(FPS).finish()
    with pytest.raises(ValueError, match="fps must be a positive integer"):
        BackgroundMp4Encoder(0)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Checkpoint:
    return Checkpoint.open(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_encode_ckpt")))


@pytest.fixture(scope="module")
def decoder(ckpt) -> VaeDecoder:
    vae = ckpt.load_vae()
    chunks = torch_vae_decode_chunks_fn(vae)
    return VaeDecoder(ckpt, torch_vae_decode_fn(vae), torch.device("cpu"), torch.float32, chunks)


def _latents(num_latent_frames: int = 4, seed: int = 3) -> torch.Tensor:
    return torch.randn(1, 16, num_latent_frames, 6, 8, generator=torch.Generator().manual_seed(seed))


def test_frames_and_mp4_equal_decode_then_encode(decoder):
    latents = _latents()
    frames, mp4 = decoder.frames_and_mp4(latents, FPS, "fast", 17)
    after = decoder.frames(latents)
    assert frames.shape == after.shape == (13, 48, 64, 3)
    # The decoder runs on the very tensors `vae.decode` gives it, a latent frame a call.
    np.testing.assert_array_equal(frames, after)
    assert mp4 == encode_mp4(frames, FPS, "fast", 17)


def test_chunks_encode_while_later_chunks_decode(ckpt, decoder, monkeypatch):
    """The decode of the last latent frame waits until the encoder has taken the first chunk: with the encode
    after the decode it would wait forever (here: fail after 60 s)."""
    first_encoded = threading.Event()
    encode = Mp4Encoder.add

    def add(self, frames):
        encode(self, frames)
        first_encoded.set()

    monkeypatch.setattr(video_module.Mp4Encoder, "add", add)
    latents = _latents(3)

    def decode_chunks(normalized):
        for index, chunk in enumerate(decoder.decode_chunks_fn(normalized)):
            if index == normalized.shape[2] - 1:
                assert first_encoded.wait(60), "the first chunk was not encoded while the decode went on"
            yield chunk

    overlapped = VaeDecoder(ckpt, decoder.decode_fn, torch.device("cpu"), torch.float32, decode_chunks)
    frames, mp4 = overlapped.frames_and_mp4(latents, FPS, "fast", 17)
    assert first_encoded.is_set() and frames.shape[0] == 9
    assert mp4 == encode_mp4(frames, FPS, "fast", 17)


def test_a_decoder_without_chunks_says_so(ckpt, decoder):
    whole_only = VaeDecoder(ckpt, decoder.decode_fn, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="no chunked decode"):
        whole_only.frames_and_mp4(_latents(1), FPS, "fast", 17)


def test_the_split_decode_cannot_encode_while_decoding():
    data = Deployment.load(DEPLOYMENTS_DIR / "cpu_torch.yaml").model_dump()
    data["components"]["vae_decoder"]["split_width"] = 2
    data["video"]["encode_while_decoding"] = True
    with pytest.raises(ValidationError, match="video.encode_while_decoding needs components.vae_decoder.split_width 1"):
        Deployment.model_validate(data)
    data["video"]["encode_while_decoding"] = False
    Deployment.model_validate(data)
