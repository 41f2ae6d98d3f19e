"""The pack in a real ComfyUI server: opt-in, skipped unless COMFYUI_DIR points at a ComfyUI checkout.

    COMFYUI_DIR=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/python] pytest tests/test_comfyui_real.py

COMFYUI_PYTHON is an interpreter with ComfyUI's requirements and vpdsr's (default: this one).
The server runs on the CPU with every folder in a temporary directory; the pack is added through
``--extra-model-paths-config`` (a ``custom_nodes`` entry pointing at a folder that links to this
checkout), so nothing is written into the ComfyUI checkout. The example workflow is converted
from the front-end's format to the API format and queued; a tiny student and a tiny CLIP written
here stand in for real models.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.clip_layouts import toy_hf_clip, write_image_tower, write_sd2_checkpoint, write_text_tower
from vpdsr import OneStepStudent, build_backbone, default_model_path, save_student
from vpdsr.semantics import build_clip, load_clip, save_clip

REPO = Path(__file__).resolve().parents[1]
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
WORKFLOW = REPO / "example_workflows" / "vpdsr_upscale_and_inspect.json"
PACK_NAME = "ComfyUI-VPD-SR"
STUDENT = "tiny-test.safetensors"
CLIP = "clip/tiny-clip.safetensors"
# An image tower and the two text towers that fit it, in ComfyUI's layouts (clip_vision, clip_l, SD 2.x)
IMAGE_TOWER = "clip_vision/tiny-vit.safetensors"
TEXT_TOWERS = ("clip/tiny-clip_l.safetensors", "checkpoints/tiny-sd2.safetensors")
INPUT_SIZE = 48
STARTUP_S = 300
RUN_S = 300

pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR or not (Path(COMFYUI_DIR) / "main.py").is_file(),
    reason="set COMFYUI_DIR to a ComfyUI checkout to run the nodes in a real ComfyUI server",
)


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log: Path) -> None:
        self.url, self.process, self.log = url, process, log

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            body = response.read()
        return json.loads(body) if response.headers.get_content_type() == "application/json" else body

    def post(self, path: str, data: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def run(self, prompt: dict) -> dict:
        """Queue a prompt and wait for its history entry."""
        status, reply = self.post("/prompt", {"prompt": prompt, "client_id": "vpdsr-test"})
        assert status == 200, reply
        return self.wait(reply["prompt_id"])

    def wait(self, prompt_id: str) -> dict:
        deadline = time.monotonic() + RUN_S
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry["status"].get("status_str") in ("success", "error"):
                return entry
            assert self.process.poll() is None, self.log.read_text()[-4000:]
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish in {RUN_S} s")

    def alive(self) -> bool:
        return self.process.poll() is None and "system" in self.get("/system_stats")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_models(models: Path) -> None:
    torch.manual_seed(0)
    parts = build_backbone("tiny")
    save_student(models / "vpdsr" / STUDENT, OneStepStudent(parts.vae, parts.unet, parts.config))
    (models / "vpdsr" / "broken.safetensors").write_bytes(b"this is not a model")
    clip, spec = build_clip("vpdsr-tiny-clip")
    save_clip(models / CLIP, clip, spec)
    toy = toy_hf_clip()
    image = write_image_tower(toy, models / IMAGE_TOWER)
    text = write_text_tower(toy, models / TEXT_TOWERS[0])
    write_sd2_checkpoint(load_clip(image, text_path=text)[0], models / TEXT_TOWERS[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Server:
    root = tmp_path_factory.mktemp("comfyui")
    folders = ("vpdsr", "clip", "clip_vision", "checkpoints")
    for folder in (*(f"models/{f}" for f in folders), "custom_nodes", "input", "output", "temp", "user"):
        (root / folder).mkdir(parents=True)
    _write_models(root / "models")
    (root / "custom_nodes" / PACK_NAME).symlink_to(REPO, target_is_directory=True)
    ramp = np.linspace(0, 255, INPUT_SIZE, dtype=np.uint8)
    Image.fromarray(
        np.stack(
            [
                np.tile(ramp, (INPUT_SIZE, 1)),
                np.tile(ramp[:, None], (1, INPUT_SIZE)),
                np.full((INPUT_SIZE, INPUT_SIZE), 90, np.uint8),
            ],
            axis=2,
        )
    ).save(root / "input" / "example.png")
    paths = root / "extra_model_paths.yaml"
    paths.write_text(
        f"vpdsr_test:\n  base_path: {root / 'models'}\n"
        + "".join(f"  {folder}: {folder}\n" for folder in folders)
        + f"  custom_nodes: {root / 'custom_nodes'}\n"
    )
    port = _free_port()
    log = root / "server.log"
    command = [
        os.environ.get("COMFYUI_PYTHON", sys.executable),
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--extra-model-paths-config",
        str(paths),
        "--input-directory",
        str(root / "input"),
        "--output-directory",
        str(root / "output"),
        "--temp-directory",
        str(root / "temp"),
        "--user-directory",
        str(root / "user"),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=COMFYUI_DIR, stdout=out, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not start in {STARTUP_S} s:\n{log.read_text()[-4000:]}")
                time.sleep(1)
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def workflow_to_prompt(workflow: dict, object_info: dict) -> dict:
    """The front-end's saved graph (nodes + links) as the API prompt the server executes.

    Widget values follow the order of the node's widget inputs; values of front-end-only widgets
    (such as Load Image's upload button) are dropped; linked inputs become [node id, output slot].
    """
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0:  # muted or bypassed
            continue
        spec = object_info[node["type"]]["input"]
        known = {*spec.get("required", {}), *spec.get("optional", {})}
        widgets = [slot["name"] for slot in node.get("inputs", []) if "widget" in slot]
        inputs = {name: value for name, value in zip(widgets, node.get("widgets_values", [])) if name in known}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, origin, origin_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _example_prompt(server: Server) -> dict:
    prompt = workflow_to_prompt(json.loads(WORKFLOW.read_text(encoding="utf-8")), server.get("/object_info"))
    for node in prompt.values():
        if node["class_type"] == "VPDSR_LoadModel" and default_model_path() is None:
            node["inputs"]["model"] = STUDENT  # until the embedded default model ships
        if node["class_type"] == "VPDSR_LoadCLIP":
            node["inputs"].update(clip_name=CLIP, config="auto")
    return prompt


def _node_of(prompt: dict, class_type: str, title_word: str = "") -> str:
    ids = [i for i, n in prompt.items() if n["class_type"] == class_type]
    if title_word:
        workflow = json.loads(WORKFLOW.read_text(encoding="utf-8"))
        titled = {str(n["id"]) for n in workflow["nodes"] if title_word in n.get("title", "")}
        ids = [i for i in ids if i in titled]
    [node_id] = ids
    return node_id


def test_object_info_lists_our_nodes(server):
    info = server.get("/object_info")
    ours = {k: v for k, v in info.items() if k.startswith("VPDSR_")}
    assert set(ours) == {"VPDSR_LoadModel", "VPDSR_OneStepSR", "VPDSR_LoadCLIP", "VPDSR_CLIPSemanticInspector"}
    assert {v["category"] for v in ours.values()} == {"image/upscaling/VPD-SR"}
    assert all(v["python_module"] == f"custom_nodes.{PACK_NAME}" for v in ours.values())
    models = info["VPDSR_LoadModel"]["input"]["required"]["model"][1]["options"]
    assert models[0] == "embedded default" and STUDENT in models
    assert CLIP in info["VPDSR_LoadCLIP"]["input"]["required"]["clip_name"][1]["options"]


def test_help_pages_are_served_where_the_front_end_looks(server):
    page = server.get(f"/extensions/{PACK_NAME}/docs/VPDSR_OneStepSR.md")
    assert page.decode().startswith("# One-Step SR")


def test_example_workflow_runs_end_to_end(server):
    prompt = _example_prompt(server)
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    outputs = entry["outputs"]
    [upscaled] = outputs[_node_of(prompt, "SaveImage", "upscaled")]["images"]
    image = Image.open(BytesIO(server.get("/view?" + urllib.parse.urlencode(upscaled))))
    scale = prompt[_node_of(prompt, "VPDSR_OneStepSR")]["inputs"]["scale"] or 4  # 0: the test student's own x4
    assert image.size == (INPUT_SIZE * scale, INPUT_SIZE * scale)
    [chart] = outputs[_node_of(prompt, "SaveImage", "chart")]["images"]
    chart_image = np.asarray(Image.open(BytesIO(server.get("/view?" + urllib.parse.urlencode(chart)))))
    assert chart_image.shape[2] == 3 and chart_image.std() > 10
    [report] = outputs[_node_of(prompt, "PreviewAny")]["text"]
    assert "Semantic consistency" in report and "LR tags:" in report


@pytest.mark.parametrize("text_tower", TEXT_TOWERS)
def test_the_inspector_runs_from_an_image_tower_and_a_text_tower(server, text_tower):
    """clip_vision + clip_l, and clip_vision + an SD 2.x checkpoint's text tower, through Load CLIP."""
    spec = server.get("/object_info")["VPDSR_LoadCLIP"]["input"]
    assert IMAGE_TOWER in spec["required"]["clip_name"][1]["options"]
    assert text_tower in spec["optional"]["text_encoder"][1]["options"]
    prompt = _example_prompt(server)
    prompt[_node_of(prompt, "VPDSR_LoadCLIP")]["inputs"].update(clip_name=IMAGE_TOWER, text_encoder=text_tower)
    entry = server.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"]
    [report] = entry["outputs"][_node_of(prompt, "PreviewAny")]["text"]
    assert "Semantic consistency" in report


def _execution_error(entry: dict) -> dict:
    assert entry["status"]["status_str"] == "error"
    [details] = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
    return details


def test_bad_model_name_is_refused_clearly_and_the_server_stays_up(server):
    prompt = _example_prompt(server)
    loader = _node_of(prompt, "VPDSR_LoadModel")
    prompt[loader]["inputs"]["model"] = "no-such-model.safetensors"
    status, reply = server.post("/prompt", {"prompt": prompt})
    if status == 400:  # ComfyUI versions that check V3 dropdown values before running
        [error] = reply["node_errors"][loader]["errors"]
        assert "no-such-model.safetensors" in error["details"]
    else:  # the others run the node, which names the file and the folders it searched
        details = _execution_error(server.wait(reply["prompt_id"]))
        assert details["node_id"] == loader and details["exception_type"].endswith("ModelFileError")
        assert "'no-such-model.safetensors' was not found in models/vpdsr" in details["exception_message"]
    assert server.alive()


def test_broken_model_file_fails_with_our_message_and_the_server_stays_up(server):
    prompt = _example_prompt(server)
    prompt[_node_of(prompt, "VPDSR_LoadModel")]["inputs"]["model"] = "broken.safetensors"
    details = _execution_error(server.run(prompt))
    assert details["exception_type"].endswith("ModelFileError")
    assert "broken.safetensors: not a readable safetensors file" in details["exception_message"]
    assert server.alive()
    assert server.run(_example_prompt(server))["status"]["status_str"] == "success"
