"""The ComfyUI nodes on small hand-written stand-ins for ComfyUI's modules and a tiny student.

The stand-ins hold real state (folders on disk, an interrupt flag, progress bars, memory calls),
so the tests check what the nodes do with ComfyUI, not which methods they call. The pack is
loaded through the repository's ``__init__.py`` under an odd folder name, the way ComfyUI's
custom-node loader does it. ``test_comfyui_real.py`` runs the same nodes in a real ComfyUI.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import os
import re
import sys
import types
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import save_file

import vpdsr.pipeline

from vpdsr import OneStepStudent, VPDPipeline, build_backbone, load_pipeline, save_student
from vpdsr.errors import ModelFileError, VPDError
from vpdsr.lora import LoraSpec, add_lora, default_lora_targets
from vpdsr.semantics import SemanticModel, build_clip, save_clip

REPO = Path(__file__).resolve().parents[1]
NODE_IDS = {"VPDSR_LoadModel", "VPDSR_OneStepSR", "VPDSR_LoadCLIP", "VPDSR_CLIPSemanticInspector"}
TORCH_DEVICE = torch.device("cpu", 0)  # told apart from the offload device, yet runs on the CPU
OFFLOAD_DEVICE = torch.device("cpu")


# --- stand-ins for ComfyUI -------------------------------------------------------------------


def _fake_folder_paths(models_dir: Path) -> types.ModuleType:
    """ComfyUI's folder registry over real folders: names relative to each folder, walked on disk."""
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(models_dir)
    exts = {".safetensors", ".pt", ".pth", ".bin", ".ckpt"}
    fp.folder_names_and_paths = {
        "checkpoints": ([str(models_dir / "checkpoints")], exts),
        "text_encoders": ([str(models_dir / "text_encoders"), str(models_dir / "clip")], exts),
        "clip_vision": ([str(models_dir / "clip_vision")], exts),
        "diffusers": ([str(models_dir / "diffusers")], ["folder"]),
        "vpdsr": ([str(models_dir / "extra_vpdsr")], set()),  # as extra_model_paths.yaml leaves it
    }

    def key(name: str) -> str:
        return {"clip": "text_encoders"}.get(name, name)

    def add_model_folder_path(name: str, path: str, is_default: bool = False) -> None:
        if key(name) in fp.folder_names_and_paths:
            paths = fp.folder_names_and_paths[key(name)][0]
            if path not in paths:
                paths.append(path)
        else:
            fp.folder_names_and_paths[key(name)] = ([path], set())

    def get_folder_paths(name: str) -> list[str]:
        return list(fp.folder_names_and_paths[key(name)][0])

    def get_filename_list(name: str) -> list[str]:
        paths, suffixes = fp.folder_names_and_paths[key(name)]
        found = set()
        for root in paths:
            for here, _, files in os.walk(root):
                for f in files:
                    if not suffixes or os.path.splitext(f)[1].lower() in suffixes:
                        found.add(os.path.relpath(os.path.join(here, f), root))
        return sorted(found)

    def get_full_path(name: str, filename: str) -> str | None:
        if key(name) not in fp.folder_names_and_paths:
            return None
        filename = os.path.relpath(os.path.join("/", filename), "/")
        for root in fp.folder_names_and_paths[key(name)][0]:
            if os.path.isfile(os.path.join(root, filename)):
                return os.path.join(root, filename)
        return None

    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = get_folder_paths
    fp.get_filename_list = get_filename_list
    fp.get_full_path = get_full_path
    return fp


class InterruptProcessingException(Exception):
    pass


@dataclass
class MemoryLog:
    """What the nodes asked of ComfyUI's model management."""

    freed: list[tuple[int, torch.device]] = field(default_factory=list)
    interrupt: bool = False


def _fake_model_management(log: MemoryLog) -> types.ModuleType:
    mm = types.ModuleType("comfy.model_management")
    mm.InterruptProcessingException = InterruptProcessingException
    mm.get_torch_device = lambda: TORCH_DEVICE
    mm.unet_offload_device = lambda: OFFLOAD_DEVICE
    mm.free_memory = lambda memory_required, device, keep_loaded=(): log.freed.append((memory_required, device))
    mm.processing_interrupted = lambda: log.interrupt

    def throw_exception_if_processing_interrupted() -> None:
        if log.interrupt:
            log.interrupt = False
            raise InterruptProcessingException()

    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    return mm


class ProgressBar:
    """Records every update; ``on_update`` lets a test press Cancel mid-run."""

    made: ClassVar[list[ProgressBar]] = []
    on_update: ClassVar[Callable[[ProgressBar], None] | None] = None

    def __init__(self, total: int, node_id: Any = None) -> None:
        self.total = total
        self.updates: list[tuple[int, int]] = []
        ProgressBar.made.append(self)

    def update_absolute(self, value: int, total: int | None = None, preview: Any = None) -> None:
        self.total = total if total is not None else self.total
        self.updates.append((value, self.total))
        if ProgressBar.on_update:
            ProgressBar.on_update(self)


def _fake_comfy_api() -> dict[str, types.ModuleType]:
    """The part of ``comfy_api.latest`` the nodes use: schema objects that keep what they are given."""

    class Port:
        def __init__(self, io_type: str, kind: str, id: str | None = None, **options: Any) -> None:
            self.io_type, self.kind, self.id, self.options = io_type, kind, id, options

    def socket(io_type: str) -> type:
        class Type:
            @staticmethod
            def Input(id: str, **options: Any) -> Port:
                return Port(io_type, "input", id, **options)

            @staticmethod
            def Output(id: str | None = None, **options: Any) -> Port:
                return Port(io_type, "output", id, **options)

        Type.io_type = io_type
        return Type

    @dataclass
    class Schema:
        node_id: str
        display_name: str | None = None
        category: str = "sd"
        inputs: list = field(default_factory=list)
        outputs: list = field(default_factory=list)
        description: str = ""

    class NodeOutput:
        def __init__(self, *args: Any, ui: Any = None) -> None:
            self.args = args
            self.ui = ui

    class ComfyNode:
        pass

    class ComfyExtension:
        pass

    io = types.ModuleType("comfy_api.latest.io")
    io.Schema, io.NodeOutput, io.ComfyNode, io.Custom = Schema, NodeOutput, ComfyNode, socket
    for name, io_type in (
        ("Image", "IMAGE"),
        ("Mask", "MASK"),
        ("Int", "INT"),
        ("Float", "FLOAT"),
        ("String", "STRING"),
        ("Combo", "COMBO"),
    ):
        setattr(io, name, socket(io_type))
    latest = types.ModuleType("comfy_api.latest")
    latest.io, latest.ComfyExtension = io, ComfyExtension
    return {"comfy_api": types.ModuleType("comfy_api"), "comfy_api.latest": latest}


@dataclass
class Comfy:
    """The loaded pack and the stand-ins it talks to."""

    nodes: dict[str, type]
    modules: dict[str, types.ModuleType]
    memory: MemoryLog
    models: Path
    extension: Any

    def module(self, name: str) -> types.ModuleType:
        return self.modules[name]


# --- models written by the tests -------------------------------------------------------------


def _tiny_student(seed: int = 0) -> OneStepStudent:
    torch.manual_seed(seed)
    parts = build_backbone("tiny")
    return OneStepStudent(parts.vae, parts.unet, parts.config)


def _lora_student(path: Path) -> None:
    student = _tiny_student()
    spec = LoraSpec("unet", "default", 2, 2.0, default_lora_targets(student.unet, ("to_q",)))
    add_lora(student.unet, spec)
    save_student(path, student, weights="lora", lora=[spec])


@pytest.fixture(scope="module")
def comfy(tmp_path_factory) -> Comfy:
    models = tmp_path_factory.mktemp("models")
    for folder in ("checkpoints", "clip", "clip_vision", "diffusers", "extra_vpdsr", "vpdsr"):
        (models / folder).mkdir()
    save_student(models / "vpdsr" / "tiny.safetensors", _tiny_student())
    save_student(models / "extra_vpdsr" / "other.safetensors", _tiny_student(seed=1))
    _lora_student(models / "vpdsr" / "lora.safetensors")
    (models / "vpdsr" / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    save_file({"w": torch.zeros(2)}, str(models / "vpdsr" / "foreign.safetensors"))
    torch.manual_seed(0)
    clip, spec = build_clip("vpdsr-tiny-clip")
    save_clip(models / "clip" / "tiny-clip.safetensors", clip, spec)
    (models / "clip" / "notes.txt").write_text("not a checkpoint")

    memory = MemoryLog()
    comfy_pkg = types.ModuleType("comfy")
    comfy_utils = types.ModuleType("comfy.utils")
    comfy_utils.ProgressBar = ProgressBar
    comfy_pkg.utils, comfy_pkg.model_management = comfy_utils, _fake_model_management(memory)
    fakes = {
        "folder_paths": _fake_folder_paths(models),
        "comfy": comfy_pkg,
        "comfy.utils": comfy_utils,
        "comfy.model_management": comfy_pkg.model_management,
        **_fake_comfy_api(),
    }
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    # ComfyUI imports a custom node folder by its path, so the package name has dashes and dots
    name = str(models.parent / "custom_nodes" / "ComfyUI-VPD-SR.git").replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py")
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    try:
        spec.loader.exec_module(package)
        extension = asyncio.run(package.comfy_entrypoint())
        nodes = {cls.define_schema().node_id: cls for cls in asyncio.run(extension.get_node_list())}
        prefix = name + ".comfyui_vpdsr."
        modules = {m[len(prefix) :]: sys.modules[m] for m in list(sys.modules) if m.startswith(prefix)}
        yield Comfy(nodes, modules, memory, models, extension)
    finally:
        for m in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[m]
        for fake, previous in saved.items():
            if previous is None:
                sys.modules.pop(fake, None)
            else:
                sys.modules[fake] = previous


@pytest.fixture(autouse=True)
def _fresh_state(request):
    ProgressBar.made.clear()
    ProgressBar.on_update = None
    if "comfy" in request.fixturenames:
        comfy = request.getfixturevalue("comfy")
        comfy.memory.freed.clear()
        comfy.memory.interrupt = False


def _load(comfy: Comfy, model: str = "tiny.safetensors", dtype: str = "auto", **extra: str) -> VPDPipeline:
    return comfy.nodes["VPDSR_LoadModel"].execute(model=model, dtype=dtype, **extra).args[0]


def _upscale(comfy: Comfy, image: torch.Tensor, pipe: VPDPipeline, **options: Any) -> torch.Tensor:
    settings = {"scale": 2.0, "tiling": "auto", "tile_size": 512, "color_fix": "adain"} | options
    return comfy.nodes["VPDSR_OneStepSR"].execute(image=image, vpd_model=pipe, **settings).args[0]


def _bhwc(batch: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, size, size, 3, generator=torch.Generator().manual_seed(seed))


# --- the pack as ComfyUI loads it ------------------------------------------------------------


def test_entrypoint_lists_the_four_nodes_in_one_category(comfy):
    assert set(comfy.nodes) == NODE_IDS
    for cls in comfy.nodes.values():
        schema = cls.define_schema()
        assert schema.category == "image/upscaling/VPD-SR" and schema.display_name and schema.description


def test_every_input_and_output_has_a_tooltip(comfy):
    for node_id, cls in comfy.nodes.items():
        schema = cls.define_schema()
        for port in schema.inputs + schema.outputs:
            assert port.options.get("tooltip"), f"{node_id}.{port.id} has no tooltip"


def test_models_vpdsr_is_registered_next_to_paths_from_extra_model_paths(comfy):
    paths, suffixes = sys.modules["folder_paths"].folder_names_and_paths["vpdsr"]
    assert paths == [str(comfy.models / "extra_vpdsr"), str(comfy.models / "vpdsr")]
    assert suffixes == {".safetensors"}
    options = _input(comfy, "VPDSR_LoadModel", "model").options["options"]
    assert options[0] == "embedded default"
    assert {"tiny.safetensors", "other.safetensors", "lora.safetensors"} <= set(options)


def test_every_node_has_a_help_page():
    docs = REPO / "comfyui_vpdsr" / "web" / "docs"
    for node_id in NODE_IDS:
        text = (docs / f"{node_id}.md").read_text(encoding="utf-8")
        assert text.startswith("# ") and "## Inputs" in text


def test_comfy_registry_metadata_is_complete():
    """What the Comfy Registry requires is there, and every link is a URL (pip refuses the package
    otherwise); one not known yet is a placeholder under the reserved ``.invalid`` domain."""
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]{0,98}", project["name"]) and "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]) and project["description"] and project["license"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    links = {**project["urls"], "Icon": comfy["Icon"]}
    assert {"Repository", "Documentation", "Bug Tracker", "Icon"} <= set(links)
    for name, url in links.items():
        parts = urllib.parse.urlsplit(url)
        assert parts.scheme == "https" and parts.hostname, (name, url)


def _import_checkout_as(name: str) -> types.ModuleType:
    """Import the repository root as a package, as ComfyUI (and pytest, for its rootdir) do."""
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return sys.modules[name]


def test_importing_the_checkout_loads_no_comfyui_code():
    try:
        package = _import_checkout_as("some_checkout")
        assert callable(package.comfy_entrypoint)
        assert (REPO / package.WEB_DIRECTORY / "docs").is_dir()
        assert not [m for m in sys.modules if m.startswith("some_checkout.")]
    finally:
        del sys.modules["some_checkout"]


def test_a_checkout_folder_named_vpdsr_hands_the_name_to_the_core():
    """pytest imports its rootdir as a package named after the folder; `import vpdsr` must stay the core."""
    core = {name: module for name, module in sys.modules.items() if name == "vpdsr" or name.startswith("vpdsr.")}
    try:
        del sys.modules["vpdsr"]
        loaded = _import_checkout_as("vpdsr")
        assert Path(loaded.__file__) == REPO / "vpdsr" / "__init__.py"
        assert loaded.load_pipeline.__module__ == "vpdsr.pipeline"
    finally:
        sys.modules.update(core)


def _input(comfy: Comfy, node_id: str, name: str):
    return next(p for p in comfy.nodes[node_id].define_schema().inputs if p.id == name)


# --- Load VPD Model --------------------------------------------------------------------------


def test_loader_gives_a_pipeline_parked_on_the_offload_device(comfy):
    pipe = _load(comfy)
    assert isinstance(pipe, VPDPipeline)
    assert pipe.device == OFFLOAD_DEVICE and pipe.dtype == torch.float32
    assert pipe.info["backbone"] == "tiny"


def test_loader_cache_hits_without_reloading_and_reloads_a_changed_file(comfy, monkeypatch):
    loading = comfy.module("loading")
    loads = []

    def counting_load(*args, **kwargs):
        loads.append(args[0])
        return load_pipeline(*args, **kwargs)

    monkeypatch.setattr(vpdsr.pipeline, "load_pipeline", counting_load)  # the node imports it at the first load
    loading.STUDENTS.clear()
    first = _load(comfy)
    assert _load(comfy) is first and len(loads) == 1
    assert _load(comfy, dtype="bf16") is not first and len(loads) == 2
    path = comfy.models / "vpdsr" / "tiny.safetensors"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    reloaded = _load(comfy)
    assert reloaded is not first and len(loads) == 3


def test_loader_fingerprint_follows_the_file(comfy):
    node = comfy.nodes["VPDSR_LoadModel"]
    before = node.fingerprint_inputs(model="other.safetensors", dtype="auto")
    assert before == node.fingerprint_inputs(model="other.safetensors", dtype="auto")
    path = comfy.models / "extra_vpdsr" / "other.safetensors"
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert node.fingerprint_inputs(model="other.safetensors", dtype="auto") != before
    missing = node.fingerprint_inputs(model="gone.safetensors", dtype="auto")
    assert math.isnan(missing[0])  # never equal to itself: ComfyUI runs the node and reports the error


def test_missing_embedded_default_says_where_to_put_a_model(comfy, monkeypatch):
    monkeypatch.setattr(comfy.module("folders"), "default_model_path", lambda: None)
    with pytest.raises(ModelFileError, match=r"no embedded default model.*models/vpdsr"):
        _load(comfy, model="embedded default")


def test_embedded_default_loads_when_the_package_ships_one(comfy, monkeypatch):
    monkeypatch.setattr(
        comfy.module("folders"), "default_model_path", lambda: comfy.models / "vpdsr" / "tiny.safetensors"
    )
    assert _load(comfy, model="embedded default").info["backbone"] == "tiny"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gone.safetensors", r"'gone.safetensors' was not found in models/vpdsr"),
        ("broken.safetensors", r"broken.safetensors: not a readable safetensors file"),
        ("foreign.safetensors", r"foreign.safetensors: a safetensors file, but not a vpdsr model"),
        ("lora.safetensors", r"lora.safetensors is a LoRA student .*\(choose its base model in 'base'"),
    ],
)
def test_bad_model_files_fail_with_a_clear_message(comfy, name, message):
    with pytest.raises(ModelFileError, match=message):
        _load(comfy, model=name)


def test_unknown_base_fails_with_a_clear_message(comfy):
    with pytest.raises(ModelFileError, match=r"base model 'checkpoints/sd_turbo.safetensors' was not found"):
        _load(comfy, model="lora.safetensors", base="checkpoints/sd_turbo.safetensors")


def test_base_list_offers_single_files_and_diffusers_folders(comfy):
    ckpt = comfy.models / "checkpoints" / "sd_turbo.safetensors"
    folder = comfy.models / "diffusers" / "sd-turbo"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    (comfy.models / "checkpoints" / "old.ckpt").write_bytes(b"")
    ckpt.write_bytes(b"")
    try:
        options = _input(comfy, "VPDSR_LoadModel", "base").options["options"]
        assert options == ["none", "checkpoints/sd_turbo.safetensors", "diffusers/sd-turbo"]
        folders = comfy.module("folders")
        assert folders.base_path("diffusers/sd-turbo") == folder
        assert folders.base_path("checkpoints/sd_turbo.safetensors") == ckpt
        assert folders.base_path("none") is None
    finally:
        ckpt.unlink()
        (comfy.models / "checkpoints" / "old.ckpt").unlink()
        (folder / "model_index.json").unlink()
        folder.rmdir()


# --- One-Step SR -----------------------------------------------------------------------------


def test_upscale_keeps_comfyuis_bhwc_layout_and_matches_the_core(comfy):
    pipe = _load(comfy)
    image = _bhwc(batch=2, size=16)
    out = _upscale(comfy, image, pipe)
    assert out.shape == (2, 32, 32, 3) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1
    expected = pipe(image.permute(0, 3, 1, 2), scale=2.0, tile=None, color_fix="adain")
    torch.testing.assert_close(out, expected.permute(0, 2, 3, 1))


def test_scale_0_is_the_models_own_and_memory_counts_the_size_the_network_runs_at(comfy):
    schema = comfy.nodes["VPDSR_OneStepSR"].define_schema()
    [scale] = [i for i in schema.inputs if i.id == "scale"]
    assert scale.options["default"] == 0 and "model's own" in scale.options["tooltip"]
    pipe = _load(comfy)
    image = _bhwc(size=16)
    torch.testing.assert_close(_upscale(comfy, image, pipe, scale=0.0), _upscale(comfy, image, pipe, scale=4.0))
    comfy.memory.freed.clear()
    _upscale(comfy, image, pipe, scale=2.0)  # runs at the model's x4, then brought down to x2
    [(required, _)] = comfy.memory.freed
    assert required == comfy.module("nodes_upscale").memory_estimate(pipe, image, 4.0, None)


def test_upscale_frees_memory_runs_on_the_torch_device_and_offloads_after(comfy):
    pipe = _load(comfy)
    seen = []
    ProgressBar.on_update = lambda bar: seen.append(pipe.device)
    _upscale(comfy, _bhwc(), pipe)
    weights = sum(t.numel() * t.element_size() for t in pipe.student.state_dict().values())
    [(required, device)] = comfy.memory.freed
    assert device == TORCH_DEVICE and required > weights
    assert seen and set(seen) == {TORCH_DEVICE}
    assert pipe.device == OFFLOAD_DEVICE


def test_out_of_memory_names_the_nodes_dtype_input_and_offloads(comfy, monkeypatch):
    pipe = _load(comfy)

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(pipe, "_upscale", no_memory)
    with pytest.raises(VPDError, match=r"out of cpu memory .*\(choose dtype fp16 in Load VPD Model") as caught:
        _upscale(comfy, _bhwc(), pipe)
    assert "--" not in str(caught.value)
    assert pipe.device == OFFLOAD_DEVICE


def test_progress_advances_once_per_tile_call(comfy, monkeypatch):
    pipe = _load(comfy)
    convs = []
    hook = pipe.student.vae.decoder.conv_out.register_forward_pre_hook(lambda *_: convs.append(1))
    try:
        _upscale(comfy, _bhwc(size=16), pipe, tiling="fixed", tile_size=16)
    finally:
        hook.remove()
    [bar] = ProgressBar.made
    assert len(bar.updates) == bar.total > 3
    assert bar.updates == [(i, bar.total) for i in range(1, bar.total + 1)]
    assert len(convs) > 1  # it really was tiled: the decoder's last conv ran once per tile


def test_tiling_auto_off_and_fixed_mean_what_they_mean_in_the_core(comfy):
    nodes_upscale = comfy.module("nodes_upscale")
    assert [nodes_upscale.core_tile(mode, 256) for mode in ("auto", "off", "fixed")] == [None, 0, 256]
    pipe = _load(comfy)
    image = _bhwc(size=16)
    off = _upscale(comfy, image, pipe, tiling="off", tile_size=16)  # the size is unused when off
    expected = pipe(image.permute(0, 3, 1, 2), scale=2.0, tile=0, color_fix="adain")
    torch.testing.assert_close(off, expected.permute(0, 2, 3, 1))
    big = torch.zeros(1, 1, 1, 3).expand(1, 2048, 2048, 3)  # only its shape is read
    auto, untiled = (nodes_upscale.memory_estimate(pipe, big, 2.0, tile) for tile in (None, 0))
    assert untiled > auto  # off asks for the whole image's memory, auto for one megapixel
    with pytest.raises(VPDError, match="tiling must be one of auto, off, fixed, got 0"):
        _upscale(comfy, image, pipe, tiling=0)
    with pytest.raises(VPDError, match="needs a tile_size above 0"):
        _upscale(comfy, image, pipe, tiling="fixed", tile_size=0)


def test_cancel_stops_at_the_next_tile_and_raises_comfyuis_interrupt(comfy):
    pipe = _load(comfy)

    def press_cancel(bar: ProgressBar) -> None:
        comfy.memory.interrupt = True

    ProgressBar.on_update = press_cancel
    with pytest.raises(InterruptProcessingException):
        _upscale(comfy, _bhwc(size=16), pipe, tiling="fixed", tile_size=16)
    [bar] = ProgressBar.made
    assert len(bar.updates) == 1 < bar.total
    assert comfy.memory.interrupt is False  # ComfyUI's flag is reset for the next prompt
    assert pipe.device == OFFLOAD_DEVICE


def test_mask_reaches_the_core(comfy):
    pipe = _load(comfy)
    image = _bhwc(size=16)
    keep_input = torch.zeros(1, 16, 16)
    masked = _upscale(comfy, image, pipe, mask=keep_input)
    expected = pipe(image.permute(0, 3, 1, 2), scale=2.0, color_fix="adain", mask=keep_input)
    torch.testing.assert_close(masked, expected.permute(0, 2, 3, 1))
    assert not torch.allclose(masked, _upscale(comfy, image, pipe))


def test_upscale_input_errors_are_clear(comfy):
    pipe = _load(comfy)
    with pytest.raises(VPDError, match=r"RGB IMAGE batch \(B, H, W, 3\), got shape \(1, 16, 16, 4\)"):
        _upscale(comfy, torch.rand(1, 16, 16, 4), pipe)
    with pytest.raises(VPDError, match="the mask batch has 3 masks for 2 images"):
        _upscale(comfy, _bhwc(batch=2), pipe, mask=torch.ones(3, 16, 16))
    with pytest.raises(VPDError, match="no text encoder"):
        _upscale(comfy, _bhwc(), pipe, prompt="a cat")
    assert pipe.device == OFFLOAD_DEVICE


# --- CLIP loader and inspector ---------------------------------------------------------------


def _clip(comfy: Comfy) -> SemanticModel:
    return comfy.nodes["VPDSR_LoadCLIP"].execute(clip_name="clip/tiny-clip.safetensors", config="auto").args[0]


def test_clip_loader_lists_checkpoints_and_caches_the_model(comfy):
    options = _input(comfy, "VPDSR_LoadCLIP", "clip_name").options["options"]
    assert options == ["clip/tiny-clip.safetensors"]
    configs = _input(comfy, "VPDSR_LoadCLIP", "config").options["options"]
    assert configs[0] == "auto" and "ViT-B-32" in configs
    model = _clip(comfy)
    assert isinstance(model, SemanticModel) and _clip(comfy) is model


def test_clip_loader_errors_are_clear(comfy):
    node = comfy.nodes["VPDSR_LoadCLIP"]
    with pytest.raises(ModelFileError, match=r"CLIP checkpoint 'clip/gone.safetensors' was not found"):
        node.execute(clip_name="clip/gone.safetensors", config="auto")
    with pytest.raises(ModelFileError, match="does not match CLIP config 'ViT-B-32'"):
        node.execute(clip_name="clip/tiny-clip.safetensors", config="ViT-B-32")


def test_clip_loader_joins_an_image_tower_with_a_text_tower(comfy):
    """clip_vision + clip_l, and clip_vision + an SD 2.x checkpoint's text tower: the same CLIP."""
    from tests.clip_layouts import toy_hf_clip, write_image_tower, write_sd2_checkpoint, write_text_tower
    from vpdsr.semantics import load_clip

    toy, models = toy_hf_clip(), comfy.models
    (models / "text_encoders").mkdir(exist_ok=True)
    text = write_text_tower(toy, models / "text_encoders" / "clip_l.safetensors")
    image = write_image_tower(toy, models / "clip_vision" / "vit.safetensors")
    sd2 = write_sd2_checkpoint(load_clip(image, text_path=text)[0], models / "checkpoints" / "sd2.safetensors")
    node = comfy.nodes["VPDSR_LoadCLIP"]
    try:
        options = _input(comfy, "VPDSR_LoadCLIP", "clip_name").options["options"]
        assert options == [
            "clip/clip_l.safetensors",
            "clip/tiny-clip.safetensors",
            "clip_vision/vit.safetensors",
            "checkpoints/sd2.safetensors",
        ]
        assert _input(comfy, "VPDSR_LoadCLIP", "text_encoder").options["options"] == ["none", *options]
        judges = [
            node.execute(clip_name="clip_vision/vit.safetensors", config="auto", text_encoder=name).args[0]
            for name in ("clip/clip_l.safetensors", "checkpoints/sd2.safetensors")
        ]
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            first, second = (judge.tag_logits(images) / judge.logit_scale for judge in judges)
        assert torch.allclose(first, second, atol=1e-5, rtol=0)
        with pytest.raises(ModelFileError, match=r"vit\.safetensors holds no CLIP text tower"):
            node.execute(clip_name="clip_vision/vit.safetensors", config="auto")
    finally:
        for path in (text, image, sd2):
            path.unlink()


def test_inspector_compares_output_with_input(comfy):
    sr = _bhwc(batch=2, size=32, seed=1)
    lr = _bhwc(batch=1, size=16, seed=2)  # one reference for the whole batch
    report, consistency, quality, tags, chart = (
        comfy.nodes["VPDSR_CLIPSemanticInspector"].execute(sr_image=sr, clip=_clip(comfy), top_k=5, reference=lr).args
    )
    assert "Image 1 of 2" in report and "Image 2 of 2" in report and "Semantic consistency" in report
    assert -1 <= consistency <= 1 and 0 <= quality <= 1
    assert len(tags.split(", ")) == 5 and tags in report  # the input's top tags, as in its prompt line
    assert chart.dim() == 4 and chart.shape[0] == 2 and chart.shape[3] == 3
    assert chart.dtype == torch.float32 and 0 <= chart.min() and chart.max() <= 1
    assert chart.std() > 0.05  # drawn, not blank
    [(required, device)] = comfy.memory.freed
    assert device == TORCH_DEVICE and required > 0


def test_inspector_without_reference_describes_the_image_alone(comfy):
    report, consistency, quality, tags, chart = (
        comfy.nodes["VPDSR_CLIPSemanticInspector"].execute(sr_image=_bhwc(size=32), clip=_clip(comfy), top_k=3).args
    )
    assert math.isnan(consistency) and 0 <= quality <= 1
    assert "not measured" in report and len(tags.split(", ")) == 3
    assert chart.shape[0] == 1


def test_inspector_refuses_mismatched_batches(comfy):
    with pytest.raises(VPDError, match="the reference batch has 2 images for 3 upscaled images"):
        comfy.nodes["VPDSR_CLIPSemanticInspector"].execute(
            sr_image=_bhwc(batch=3), clip=_clip(comfy), top_k=3, reference=_bhwc(batch=2)
        )


# --- the example workflow --------------------------------------------------------------------


def test_example_workflow_matches_the_node_schemas(comfy):
    """The UI-format workflow's widget values line up with our inputs, and its links are consistent."""
    [path] = (REPO / "example_workflows").glob("*.json")
    workflow = json.loads(path.read_text(encoding="utf-8"))
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, origin, origin_slot, target, target_slot, _ in workflow["links"]:
        assert nodes[origin]["outputs"][origin_slot]["links"].count(link_id) == 1
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
    ours = [n for n in nodes.values() if n["type"] in comfy.nodes]
    assert {n["type"] for n in ours} == NODE_IDS
    for node in ours:
        schema = comfy.nodes[node["type"]].define_schema()
        widgets = [p.id for p in schema.inputs if p.io_type in ("INT", "FLOAT", "STRING", "COMBO")]
        assert [i["name"] for i in node["inputs"] if "widget" in i] == widgets
        assert len(node["widgets_values"]) == len(widgets)
    # the front-end refuses a workflow with null where it expects an absent key (links may be null)
    assert _null_paths(workflow) <= {"link", "links"}
    loader = next(n for n in ours if n["type"] == "VPDSR_LoadModel")
    assert loader["widgets_values"][0] == "embedded default"
    upscaler = next(n for n in ours if n["type"] == "VPDSR_OneStepSR")
    assert upscaler["widgets_values"][0] == 0  # scale: the model's own


def _null_paths(value: Any, key: str = "") -> set[str]:
    """The keys under which a JSON document holds null."""
    if value is None:
        return {key}
    if isinstance(value, dict):
        return set().union(*(_null_paths(v, k) for k, v in value.items()))
    if isinstance(value, list):
        return set().union(*(_null_paths(v, key) for v in value))
    return set()
