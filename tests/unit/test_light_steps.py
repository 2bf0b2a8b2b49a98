"""The steps that run no model (preprocess, postprocess, stream) import no torch, diffusers or ONNX Runtime: each
stub is its own process, and those libraries cost every stub hundreds of MB. Each check runs in a fresh
interpreter, since this one has imported them all. The steps that run a model still load their modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from factories import load_deployment
from wan_build.render import CLASS_NAMES, render_repository

TESTS = Path(__file__).resolve().parents[1]
MODEL_STACK = ("torch", "diffusers", "onnxruntime")
LIGHT = ("preprocess", "postprocess", "stream")
HEAVY = ("text_encoder", "scheduler", "vae_decoder")


def _run(script: str, *args: str) -> dict:
    """Run `script` with `args` in a fresh interpreter (this tests folder on its path) and return the JSON it prints
    last."""
    done = subprocess.run(
        [sys.executable, "-c", f"import sys\nsys.path.insert(0, {str(TESTS)!r})\n{script}", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _loaded(names: tuple[str, ...]) -> str:
    return f"[m for m in {names!r} if m in sys.modules]"


def test_every_role_has_its_module_and_class():
    assert set(CLASS_NAMES) == set(LIGHT) | set(HEAVY)


@pytest.mark.parametrize("role", LIGHT)
def test_light_step_imports_no_model_stack(role):
    got = _run(
        f"import json\nfrom wan_triton.serving.models.{role} import {CLASS_NAMES[role]} as cls\n"
        f"print(json.dumps({{'role': cls.role, 'loaded': {_loaded(MODEL_STACK)}}}))"
    )
    assert got == {"role": role, "loaded": []}


@pytest.mark.parametrize("role", HEAVY)
def test_heavy_step_still_loads(role):
    got = _run(
        f"import json\nfrom wan_triton.serving.models.{role} import {CLASS_NAMES[role]} as cls\n"
        f"print(json.dumps({{'role': cls.role, 'torch': 'torch' in sys.modules}}))"
    )
    assert got == {"role": role, "torch": True}


# Loads preprocess, postprocess and stream as Triton would (fake `triton_python_backend_utils`), runs a request with
# an image through preprocess and frames through postprocess, and reports what is loaded then.
_WORK = f"""
import io, json
import numpy as np
from PIL import Image
from fakes import pb_utils
sys.modules["triton_python_backend_utils"] = pb_utils
from wan_triton.serving.models.postprocess import Postprocess
from wan_triton.serving.models.preprocess import Preprocess
from wan_triton.serving.models.stream import Stream
from wan_triton.serving.stream import shrink_frame

def load(cls, role):
    model = cls()
    name = "wan_t2v_" + role
    model.initialize({{"model_repository": sys.argv[1] + "/" + name, "model_name": name, "model_version": "1"}})
    return model

def tensor(name, array):
    return pb_utils.Tensor(name, np.asarray(array))

png = io.BytesIO()
Image.new("RGB", (40, 24), (200, 30, 60)).save(png, format="PNG")
request = {{
    "prompt": tensor("prompt", np.array([b"a red square"], dtype=object)),
    "height": tensor("height", np.array([32], dtype=np.int64)),
    "width": tensor("width", np.array([64], dtype=np.int64)),
    "image": tensor("image", np.array([png.getvalue()], dtype=object)),
}}
pre = load(Preprocess, "preprocess").handle(request)
out = {{t.name(): t.as_numpy() for t in pre.output_tensors}}
frames = np.full((5, 32, 64, 3), 90, dtype=np.uint8)
post = load(Postprocess, "postprocess").handle(
    {{"request": tensor("request", out["request"]), "decoded_frames": tensor("decoded_frames", frames)}}
)
stream = load(Stream, "stream")
stream.finalize()
print(json.dumps({{
    "input_ids": list(out["input_ids"].shape),
    "image": list(out["condition_image"].shape),
    "mp4": bytes(post.output_tensors[0].as_numpy()[0])[4:8].decode(),
    "preview": list(shrink_frame(np.zeros((720, 1280, 3), dtype=np.uint8)).shape),
    "loaded": {_loaded(MODEL_STACK)},
}}))
"""


def test_light_steps_serve_a_request_without_the_model_stack(ti2v_checkpoint, tmp_path):
    """Loading, tokenizing, the condition image, the MP4 and a preview frame: the work itself loads none either."""
    repo = render_repository(load_deployment("cpu_torch"), ti2v_checkpoint, tmp_path / "no_graphs", tmp_path / "repo")
    got = _run(_WORK, str(repo))
    assert got["input_ids"][0] == 2  # prompt and (guidance on by default) the negative prompt
    assert got["image"] == [1, 32, 64, 3]
    assert got["mp4"] == "ftyp"
    assert got["preview"] == [144, 256, 3]
    assert got["loaded"] == []
