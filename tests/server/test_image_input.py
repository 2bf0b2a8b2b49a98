"""The `image` input on the real server (the session server of tests/conftest.py; its models: tests/served.py).

A text-to-video model (`wan_onnx`) refuses an image; `wan_image` (the tiny TI2V checkpoint: the image is
optional, one expert, sizes in multiples of 32) takes one: every bad image is INVALID_ARG naming `image` and the
server goes on serving; a good image goes through the ensemble, the stream model, the client's `--image`, batching,
deadlines, cancellation and the result cache.
"""

from __future__ import annotations

import io
import re
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from factories import LONGEST_CPU
from served import (
    IMAGE_BLOCKER,
    IMAGE_LIMITS,
    IMAGE_MODEL,
    PROGRESS,
    STOP_WAIT_S,
    Stream,
    behind_blocker,
    infer,
    metric_samples,
    metric_value,
)
from wan_build.render import CACHED_PIPELINE
from wan_client import EXIT_INVALID_ARGUMENT, EXIT_OK

T2V_MODEL = "wan_onnx"
CLIENT = (sys.executable, "-m", "wan_client")
# Every request to wan_image carries a seed: its result cache is on.
REQUEST = dict(prompt="a kite over a beach", seed=41, height=32, width=64, num_frames=5, num_inference_steps=3)
LONG = dict(prompt="a long image request", seed=42, **LONGEST_CPU)


def _png(width: int = 40, height: int = 24, shift: int = 0, fmt: str = "PNG") -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 9 + shift) % 256, (y * 11) % 256, (x + y + shift) % 256], axis=-1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _png_bomb(side: int) -> bytes:
    """A PNG header declaring side x side pixels, with almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


IMAGE = _png()
BAD_IMAGES = {
    "empty": (b"", "got 0 bytes"),
    "undecodable": (b"these bytes are no image", "not an image"),
    "truncated": (_png(200, 150)[:300], "could not decode"),
    "gif": (_png(fmt="GIF"), "got a GIF image"),
    "bmp": (_png(fmt="BMP"), "got a BMP image"),
    "too_many_bytes": (b"\x89PNG" + b"\0" * IMAGE_LIMITS["max_image_bytes"], "must be at most 65536 bytes"),
    # 4000x4000 is above the deployment's limit; 20000x20000 also above Pillow's own (which is handled too).
    "too_many_pixels": (_png_bomb(4_000), f"at most {IMAGE_LIMITS['max_image_pixels']} pixels; got 4000x4000"),
    "too_many_pixels_bomb": (_png_bomb(20_000), f"at most {IMAGE_LIMITS['max_image_pixels']} pixels; got a larger"),
}


def _invalid(client, model: str, request: dict) -> str:
    with pytest.raises(InferenceServerException) as info:
        infer(client, model, request, outputs=("video",))
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT", info.value
    return info.value.message()


def _counter(server, name: str, **labels) -> float:
    return metric_value(metric_samples(server), name, **labels)


# --- refusals ----------------------------------------------------------------------------------------------------


def test_text_to_video_model_refuses_an_image_and_keeps_serving(client):
    message = _invalid(client, T2V_MODEL, {**REQUEST, "image": IMAGE})
    assert "image: this model is text-to-video and takes no image" in message
    frames = infer(client, T2V_MODEL, REQUEST, outputs=("frames",)).as_numpy("frames")
    assert frames.shape == (5, 32, 64, 3)


def test_text_to_video_stream_refuses_an_image(server):
    stream = Stream(server.grpc_url, f"{T2V_MODEL}_stream")
    try:
        stream.send({**REQUEST, "image": IMAGE})
        with pytest.raises(InferenceServerException, match=r"^\[INVALID_ARG\] image: this model is text-to-video"):
            stream.until_final()
    finally:
        stream.close()


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_is_invalid_arg_naming_image_then_a_good_one_succeeds(client, case):
    data, expected = BAD_IMAGES[case]
    started = time.monotonic()
    message = _invalid(client, IMAGE_MODEL, {**REQUEST, "image": data})
    assert "image: " in message and expected in message, message
    assert time.monotonic() - started < 30  # refused in preprocess, before any model work
    result = infer(client, IMAGE_MODEL, {**REQUEST, "image": IMAGE}, outputs=("frames", "used_seed"))
    assert result.as_numpy("frames").shape == (5, 32, 64, 3)


def test_bad_image_to_the_stream_is_a_tagged_invalid_arg(server):
    stream = Stream(server.grpc_url, f"{IMAGE_MODEL}_stream")
    try:
        for data, expected in (BAD_IMAGES["gif"], BAD_IMAGES["too_many_pixels_bomb"]):
            stream.send({**REQUEST, "image": data})
            with pytest.raises(InferenceServerException, match=r"^\[INVALID_ARG\] image: ") as info:
                stream.until_final()
            assert expected in str(info.value)
    finally:
        stream.close()


def test_size_not_a_multiple_is_refused_never_rounded(client):
    # This checkpoint's multiple is 32 (a 16x VAE and patches of 2): 48 is refused, not rounded.
    message = _invalid(client, IMAGE_MODEL, {**REQUEST, "width": 48, "image": IMAGE})
    assert "width: must be a positive multiple of 32 pixels" in message and "got 48" in message


def test_single_expert_model_refuses_guidance_scale_2(client):
    message = _invalid(client, IMAGE_MODEL, {**REQUEST, "guidance_scale_2": 3.0, "image": IMAGE})
    assert "guidance_scale_2: this model has one expert" in message


# --- a good image through every path ----------------------------------------------------------------------------


def test_image_is_optional_on_this_model(client):
    without = infer(client, IMAGE_MODEL, {**REQUEST, "seed": 43}, outputs=("frames", "used_seed"))
    assert without.as_numpy("frames").shape == (5, 32, 64, 3) and int(without.as_numpy("used_seed")[0]) == 43


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_other_allowed_formats_and_sizes_are_taken(client, fmt):
    # Another format, and a source size far from the video's (it is stretched to 32x64).
    result = infer(client, IMAGE_MODEL, {**REQUEST, "seed": 44, "image": _png(300, 90, fmt=fmt)}, outputs=("video",))
    assert len(bytes(result.as_numpy("video")[0])) > 0


def test_stream_with_an_image_reports_progress_and_previews(server):
    stream = Stream(server.grpc_url, f"{IMAGE_MODEL}_stream")
    try:
        stream.send({**REQUEST, "seed": 45, "num_inference_steps": 4, "preview": 2, "image": IMAGE})
        progress, final = stream.until_final()
    finally:
        stream.close()
    # A preview every 2 steps (the newest due one is relayed; the last step's always arrives).
    previews = [(int(r.as_numpy("step")[0]), r.as_numpy("preview_frame")) for r in progress]
    previews = [(step, frame) for step, frame in previews if frame is not None]
    assert previews and previews[-1][0] == 4 and {s for s, _ in previews} <= {2, 4}, [s for s, _ in previews]
    assert all(frame.shape == (32, 64, 3) for _, frame in previews)
    assert [int(r.as_numpy("step")[0]) for r in progress][-1] == 4
    assert final.as_numpy("frames").shape == (5, 32, 64, 3) and int(final.as_numpy("used_seed")[0]) == 45


def test_unary_deadline_with_an_image(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as caught:
        infer(client, IMAGE_MODEL, {**LONG, "image": IMAGE, "timeout_s": 0.5}, outputs=("video",))
    assert caught.value.status() == "StatusCode.CANCELLED"
    # 0.5 s is well short of the request's time on an idle machine (1 to 3 s), and a loaded one may keep it queued
    # (behind another test's request, or in the batcher) past it: the deadline may fall in the queue or in the loop,
    # and either way says which.
    message = caught.value.message()
    assert "timeout_s: deadline exceeded" in message and ("of 50" in message or "while queued" in message), message


def test_cancelled_image_stream_stops_the_loop(server):
    labels = dict(model=IMAGE_MODEL, stage="scheduler", outcome="cancelled")
    before = _counter(server, "wan_requests_total", **labels)
    stream = Stream(server.grpc_url, f"{IMAGE_MODEL}_stream")
    stream.send({**LONG, "seed": 46, "image": IMAGE}, outputs=PROGRESS)
    step = 0
    while step < 2:
        result, error = stream.next()
        assert error is None, error
        step = int(result.as_numpy("step")[0])
    stream.close(cancel=True)
    deadline = time.monotonic() + STOP_WAIT_S
    while _counter(server, "wan_requests_total", **labels) < before + 1:
        assert time.monotonic() < deadline, "the scheduler never stopped the cancelled request"
        time.sleep(0.1)


def _batch_sizes(server) -> dict[float, float]:
    samples = metric_samples(server)
    return {
        float(labels["le"]): v
        for name, labels, v in samples
        if name == "wan_batch_size_bucket" and labels.get("model") == IMAGE_MODEL
    }


def test_two_same_shape_image_requests_batch_together_and_apart_from_one_without(server):
    """Two image requests (different images) and one without, all of one shape, queued behind a long request: they
    are handed over together when it is cancelled, and run as a batch of 2 and a batch of 1."""
    before = _batch_sizes(server)
    shape = dict(prompt="batched", height=32, width=64, num_frames=5, num_inference_steps=2)
    requests = [
        {**shape, "seed": 50, "image": _png(shift=1)},
        {**shape, "seed": 51, "image": _png(shift=2)},
        {**shape, "seed": 52},
    ]
    results, _ = behind_blocker(server, IMAGE_MODEL, requests, blocker=IMAGE_BLOCKER)
    assert all(isinstance(f, np.ndarray) and f.shape == (5, 32, 64, 3) for _, f in results), results
    after = _batch_sizes(server)

    def loops_of(size: int) -> float:
        def at_most(h: dict, n: int) -> float:
            return h.get(float(n), 0.0) if n > 0 else 0.0

        return (at_most(after, size) - at_most(after, size - 1)) - (at_most(before, size) - at_most(before, size - 1))

    # The (cancelled) blocker and the request without an image ran alone; the two image requests together.
    assert (loops_of(1), loops_of(2)) == (2, 1), (before, after)
    # Whether the request without an image came in the same execute call is Triton's choice (its condition image
    # has another shape); the scheduler never runs it with the other two.
    handed = re.findall(
        rf"{IMAGE_MODEL}_scheduler: (\d+) requests handed over together, run as (\d+) batches",
        server.log_path.read_text(encoding="utf-8", errors="replace"),
    )
    assert ("2", "1") in handed or ("3", "2") in handed, handed


# --- the result cache ----------------------------------------------------------------------------------------------


def _cache_counts(client) -> tuple[int, int]:
    stats = client.get_inference_statistics(f"{IMAGE_MODEL}_{CACHED_PIPELINE}", as_json=True)["model_stats"][0]
    inference = stats["inference_stats"]
    return int(inference.get("cache_hit", {}).get("count", 0)), int(inference.get("cache_miss", {}).get("count", 0))


def test_result_cache_is_keyed_by_the_image_bytes(client):
    request = {**REQUEST, "seed": 60, "image": _png(shift=5)}
    hits0, misses0 = _cache_counts(client)
    first = infer(client, IMAGE_MODEL, request, outputs=("video",))
    assert _cache_counts(client) == (hits0, misses0 + 1)
    again = infer(client, IMAGE_MODEL, request, outputs=("video",))
    assert _cache_counts(client) == (hits0 + 1, misses0 + 1)
    assert bytes(again.as_numpy("video")[0]) == bytes(first.as_numpy("video")[0])
    # Every other input the same, another image: a miss; no image at all: a miss.
    infer(client, IMAGE_MODEL, {**request, "image": _png(shift=6)}, outputs=("video",))
    assert _cache_counts(client) == (hits0 + 1, misses0 + 2)
    infer(client, IMAGE_MODEL, {k: v for k, v in request.items() if k != "image"}, outputs=("video",))
    assert _cache_counts(client) == (hits0 + 1, misses0 + 3)


# --- the command-line client ----------------------------------------------------------------------------------------


def _run_client(server, model: str, *args: str) -> subprocess.CompletedProcess:
    command = [*CLIENT, "--url", server.grpc_url, "--model", model, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=STOP_WAIT_S)


def test_client_sends_image_file(server, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(IMAGE)
    args = ("--prompt", "a kite", "--seed", "61", "--height", "32", "--width", "64", "--num-frames", "5")
    done = _run_client(
        server, IMAGE_MODEL, *args, "--steps", "2", "--image", str(photo), "--output", str(tmp_path / "kite.mp4")
    )
    assert done.returncode == EXIT_OK, done.stderr
    assert (tmp_path / "kite.mp4").stat().st_size > 0
    streamed = _run_client(
        server,
        IMAGE_MODEL,
        *args,
        "--steps",
        "2",
        "--stream",
        "--image",
        str(photo),
        "--output",
        str(tmp_path / "s.mp4"),
    )
    assert streamed.returncode == EXIT_OK, streamed.stderr
    refused = _run_client(server, T2V_MODEL, *args, "--image", str(photo), "--output", str(tmp_path / "no.mp4"))
    assert refused.returncode == EXIT_INVALID_ARGUMENT, refused.stderr
    assert "image: this model is text-to-video" in refused.stderr


def test_the_image_conditions_the_video(client):
    """Same prompt and seed: another image, or none, gives another video (TI2V: the image is the first frame's
    latents)."""
    request = {**REQUEST, "seed": 70}
    first = infer(client, IMAGE_MODEL, {**request, "image": _png(shift=10)}, outputs=("frames",)).as_numpy("frames")
    other = infer(client, IMAGE_MODEL, {**request, "image": _png(shift=90)}, outputs=("frames",)).as_numpy("frames")
    none = infer(client, IMAGE_MODEL, request, outputs=("frames",)).as_numpy("frames")
    assert not np.array_equal(first, other) and not np.array_equal(first, none)
