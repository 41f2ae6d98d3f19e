"""Start-up time of the things a user waits for, as a table: each one in a fresh process.

    python -m bench.startup [--repeats 3]

A user pays the import time on every command, and ComfyUI imports the pack at its own start-up,
so these numbers are the floor of every run. Each case runs ``--repeats`` times in a fresh
interpreter (a warm interpreter has its modules imported already, which is what is measured), and
the table gives the median wall seconds with the range. The targets are those of issue #24 for a
2-core machine; the load average is printed, since a busy machine inflates every row.

The cases:

- ``upscale``: ``vpdsr upscale`` of a 128 px example (``gradio_app/examples/nuthatch.png``) with
  the embedded default model, into a temporary folder: what a first try costs end to end;
- ``ComfyUI loads the pack``: what ComfyUI does with the repository at its start-up (import it,
  call ``comfy_entrypoint``, read the node schemas), timed inside the child after ``import torch``,
  which ComfyUI has done already;
- ``missing file``: ``vpdsr info missing.safetensors``, which should answer before torch loads;
- ``import vpdsr.pipeline``: the core's pipeline module, what the demo and the nodes import.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "gradio_app" / "examples" / "nuthatch.png"

# What ComfyUI does with a custom node folder at its own start-up (nodes.load_custom_node): import it
# by path as a package named after the folder, await comfy_entrypoint(), list the nodes and read each
# schema. ComfyUI has imported torch long before, so the child does too and times only what comes
# after; the ComfyUI modules the pack touches are minimal stand-ins (no ComfyUI is needed).
COMFY_START = f"""
import asyncio, importlib.util, sys, time, types
import torch

class Port:
    def __init__(self, *args, **options): self.options = options
class Socket:
    Input = Output = Port
io = types.ModuleType("comfy_api.latest.io")
io.Schema = io.NodeOutput = Port
io.ComfyNode = object
io.Custom = lambda name: Socket
for name in ("Image", "Mask", "Int", "Float", "String", "Combo", "Boolean"):
    setattr(io, name, Socket)
latest = types.ModuleType("comfy_api.latest")
latest.io, latest.ComfyExtension = io, object
models = "no-models"  # a folder that does not exist: no model files to list
paths = types.ModuleType("folder_paths")
paths.models_dir, paths.folder_names_and_paths = models, {{}}
paths.add_model_folder_path = lambda name, path, is_default=False: paths.folder_names_and_paths.setdefault(
    name, ([path], set()))
paths.get_folder_paths = lambda name: [models]
paths.get_filename_list = lambda name: []
paths.get_full_path = lambda name, file: None
comfy = types.ModuleType("comfy")
comfy.utils, comfy.model_management = types.ModuleType("comfy.utils"), types.ModuleType("comfy.model_management")
comfy.utils.ProgressBar = object
sys.modules.update({{"comfy_api": types.ModuleType("comfy_api"), "comfy_api.latest": latest, "folder_paths": paths,
                    "comfy": comfy, "comfy.utils": comfy.utils, "comfy.model_management": comfy.model_management}})

start = time.perf_counter()
spec = importlib.util.spec_from_file_location("custom_pack", {str(ROOT / "__init__.py")!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
module = importlib.util.module_from_spec(spec)
sys.modules["custom_pack"] = module
spec.loader.exec_module(module)
extension = asyncio.run(module.comfy_entrypoint())
for node in asyncio.run(extension.get_node_list()):
    node.define_schema()
print("seconds", time.perf_counter() - start)
"""


def cases(workdir: Path) -> list[tuple[str, list[str], float | None]]:
    """(name, command, target seconds or None) for each row of the table."""
    py = sys.executable
    return [
        ("vpdsr upscale (128 px example)",
         [py, "-m", "vpdsr", "upscale", str(EXAMPLE), "-o", str(workdir / "out"), "--overwrite", "-q"], 4.0),
        ("ComfyUI loads the pack, after torch", [py, "-c", COMFY_START], 1.5),
        ("vpdsr info missing.safetensors", [py, "-m", "vpdsr", "info", str(workdir / "missing.safetensors")], 1.0),
        ("import vpdsr.pipeline", [py, "-c", "import vpdsr.pipeline"], None),
    ]  # fmt: skip


def time_once(name: str, command: list[str], expect_ok: bool) -> float:
    """Wall seconds of one fresh process, or the seconds it reports itself (``seconds N`` on stdout).
    A missing-file error is expected to fail, with one line and no traceback; anything else that goes
    wrong stops the benchmark rather than timing an error."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if "Traceback" in done.stderr or (done.returncode == 0) != expect_ok:
        raise SystemExit(f"bench.startup: {name!r} exited {done.returncode}:\n{done.stderr}")
    reported = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("seconds ")]
    return float(reported[-1]) if reported else seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per row (default 3)")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs; "
          f"median of {args.repeats} fresh processes\n")  # fmt: skip
    print(f"| {'what':<34} | median s | range s     | target s |")
    print(f"|{'-' * 36}|----------|-------------|----------|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, command, target in cases(Path(tmp)):
            runs = [time_once(name, command, expect_ok="missing" not in name) for _ in range(args.repeats)]
            span = f"{min(runs):.2f}-{max(runs):.2f}"
            goal = f"<= {target:g}" if target else ""
            print(f"| {name:<34} | {statistics.median(runs):8.2f} | {span:<11} | {goal:<8} |", flush=True)
    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
