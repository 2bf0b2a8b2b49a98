"""The Wan VAE around the engines: latents to pixels (undo the normalization, decode) and a condition image to
normalized latents (encode)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from wan_triton.model.checkpoint import Checkpoint
from wan_triton.model.frames import to_uint8_frames
from wan_triton.model.video import BackgroundMp4Encoder

logger = logging.getLogger(__name__)


class VaeDecoder:
    """`decode_fn` maps normalized-back latents [1, z, T, h, w] to video [1, 3, F, H, W] in [-1, 1];
    `decode_chunks_fn`, where given, maps them to the same video a chunk [1, 3, frames, H, W] at a time, as each
    latent frame is decoded (what `frames_and_mp4` needs).

    `fallback`, where given, makes the decoder that takes over when this one's video is not finite (a float16 decode
    whose activations overflowed): made on first use, it decodes that clip and every later one.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        decode_fn: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
        decode_chunks_fn: Callable[[torch.Tensor], Iterator[torch.Tensor]] | None = None,
        fallback: Callable[[], VaeDecoder] | None = None,
    ) -> None:
        cfg = ckpt.config("vae")
        z_dim = int(cfg["z_dim"])
        self.mean = torch.tensor(cfg["latents_mean"]).view(1, z_dim, 1, 1, 1).to(device, dtype)
        # Kept as the reciprocal and divided by, exactly as WanPipeline does, so results match bit for bit.
        self.inv_std = 1.0 / torch.tensor(cfg["latents_std"]).view(1, z_dim, 1, 1, 1).to(device, dtype)
        self.decode_fn = decode_fn
        self.decode_chunks_fn = decode_chunks_fn
        self.device = device
        self.dtype = dtype
        self.frames_per_latent_frame = ckpt.vae_scale_factor_temporal  # after the first latent frame's one
        self.spatial_scale = ckpt.vae_scale_factor_spatial
        self._make_fallback = fallback
        self._fallback: VaeDecoder | None = None

    def _takeover(self) -> VaeDecoder:
        """The decoder to use from now on, after a video that is not finite (only where a fallback was given)."""
        assert self._make_fallback is not None
        if self._fallback is None:
            logger.warning("the %s VAE decode gave a video that is not finite: float32 decodes from now on", self.dtype)
            self._fallback = self._make_fallback()
        return self._fallback

    def _denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.to(self.device, self.dtype) / self.inv_std + self.mean

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.decode_fn(self._denormalize(latents))

    def frames(self, latents: torch.Tensor) -> np.ndarray | None:
        """uint8 RGB frames [F, H, W, 3] (None on a rank of a split decode other than 0)."""
        if self._fallback is not None:
            return self._fallback.frames(latents)
        video = self(latents)
        if video is None:
            return None
        if self._make_fallback is not None and not bool(torch.isfinite(video).all()):
            return self._takeover().frames(latents)
        return to_uint8_frames(video)

    def frame_chunks(self, latents: torch.Tensor, into: np.ndarray | None = None) -> Iterator[np.ndarray]:
        """The uint8 RGB frames of one clip's latents [1, z, T, h, w], a chunk [frames, H, W, 3] per latent frame as
        it is decoded; together, `frames(latents)`. With `into` ([F, H, W, 3] uint8, F the clip's frame count) each
        chunk is copied from the device straight into its place there, and the chunk is that slice. A chunk that is
        not finite raises `NotFiniteError` (with a fallback; `frames_and_mp4` then decodes the clip again with it)."""
        if self.decode_chunks_fn is None:
            raise ValueError("this VAE decoder has no chunked decode")
        filled = 0
        with torch.inference_mode():
            for chunk in self.decode_chunks_fn(self._denormalize(latents)):
                if self._make_fallback is not None and not bool(torch.isfinite(chunk).all()):
                    raise NotFiniteError(f"the {self.dtype} VAE decode gave a chunk that is not finite")
                if into is None:
                    yield to_uint8_frames(chunk)
                else:
                    count = chunk.shape[2]
                    yield to_uint8_frames(chunk, out=into[filled : filled + count])
                    filled += count
        if into is not None and filled != len(into):
            raise RuntimeError(f"the VAE decode gave {filled} frames where {len(into)} were due")

    def frames_and_mp4(
        self, latents: torch.Tensor, fps: int, preset: str, crf: int, tune: str | None = None
    ) -> tuple[np.ndarray, bytes]:
        """The frames of one clip and their H.264 MP4 (`video.encode_mp4`, the same bytes), each chunk encoded on a
        worker thread while the next ones decode, so that the encode runs during the decode, not after it."""
        if self._fallback is not None:
            return self._fallback.frames_and_mp4(latents, fps, preset, crf, tune)
        started = time.perf_counter()
        encoder = BackgroundMp4Encoder(fps, preset, crf, tune)
        overflowed = False
        # The clip's frames, each chunk copied from the device into its place as it is decoded: no concatenation of
        # the whole clip (224 MB at 720p) after the last chunk.
        height, width = (latents.shape[3] * self.spatial_scale, latents.shape[4] * self.spatial_scale)
        frames = np.empty((1 + (latents.shape[2] - 1) * self.frames_per_latent_frame, height, width, 3), np.uint8)
        try:
            for chunk in self.frame_chunks(latents, into=frames):
                encoder.add(chunk)
            decoded = time.perf_counter()
            mp4 = encoder.finish()
        except NotFiniteError:  # raised only where there is a fallback
            overflowed = True
        finally:
            encoder.close()
        if overflowed:
            return self._takeover().frames_and_mp4(latents, fps, preset, crf, tune)
        finished = time.perf_counter()
        # What the overlap left: the encode's time after the last chunk decoded (the whole encode's, were it serial).
        logger.info(
            "decoded %d frames in %.2f s; the MP4 (x264 %s%s) finished %.2f s after the last chunk",
            len(frames),
            decoded - started,
            preset,
            "" if tune is None else f", tune {tune}",
            finished - decoded,
        )
        return frames, mp4


class NotFiniteError(ArithmeticError):
    """A decoded chunk holds inf or NaN: a half-precision decode overflowed."""


def torch_vae_decode_fn(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    def decode(latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents, return_dict=False)[0]

    return decode


def torch_vae_decode_chunks_fn(vae) -> Callable[[torch.Tensor], Iterator[torch.Tensor]]:
    """diffusers' decode loop, one latent frame a call, yielding each chunk: the video of `torch_vae_decode_fn` bit
    for bit (`vae_chunks.TorchVaeDecoder`)."""
    from wan_triton.model.vae_chunks import TorchVaeDecoder

    return TorchVaeDecoder(vae, whole_post_quant_conv=True).decode_chunks


class VaeEncoder:
    """A request's condition image to normalized condition latents, as `WanImageToVideoPipeline.prepare_latents`
    computes them. `encode_fn` maps a video [1, 3, F, H, W] in [-1, 1] to the posterior mean [1, z, T, h, w]."""

    def __init__(
        self,
        ckpt: Checkpoint,
        encode_fn: Callable[[torch.Tensor], torch.Tensor],
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        cfg = ckpt.config("vae")
        z_dim = int(cfg["z_dim"])
        self.mean = torch.tensor(cfg["latents_mean"]).view(1, z_dim, 1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(cfg["latents_std"]).view(1, z_dim, 1, 1, 1)
        # I2V encodes the image followed by num_frames - 1 black frames; TI2V the image alone (expand_timesteps).
        self.whole_video = not ckpt.expand_timesteps
        self.encode_fn = encode_fn
        self.device = device
        self.dtype = dtype

    def __call__(self, image: np.ndarray, num_frames: int) -> torch.Tensor:
        """image: uint8 [height, width, 3] at the request's size -> float32 [1, z, T, h, w] on the CPU (T: the
        video's latent frames for I2V, 1 for TI2V)."""
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"condition image must be uint8 [height, width, 3], got {image.dtype} {image.shape}")
        # diffusers' VaeImageProcessor: uint8 / 255 in float32, then 2x - 1.
        pixels = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        pixels = 2.0 * pixels - 1.0
        video = pixels.unsqueeze(2)
        if self.whole_video:
            h, w = image.shape[:2]
            video = torch.cat([video, video.new_zeros(1, 3, num_frames - 1, h, w)], dim=2)
        with torch.inference_mode():
            latent = self.encode_fn(video.to(self.device, self.dtype))
        latent = latent.to("cpu", torch.float32)
        return (latent - self.mean) * self.inv_std


def torch_vae_encode_fn(vae) -> Callable[[torch.Tensor], torch.Tensor]:
    def encode(video: torch.Tensor) -> torch.Tensor:
        return vae.encode(video).latent_dist.mode()

    return encode
