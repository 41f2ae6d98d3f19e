"""ComfyUI entry point: clone this repository into ``ComfyUI/custom_nodes/`` (any folder name).

ComfyUI imports this file as a package named after the folder, so everything here is relative.
The nodes import the core as ``vpdsr``; a pip-installed copy is not required, because the core
that ships beside this file is registered under that name when none is loaded yet. Nothing heavy
happens at import: ComfyUI calls ``comfy_entrypoint``, and tools that import the repository
outside ComfyUI see only these names.
"""

import importlib.util
import sys
from pathlib import Path

WEB_DIRECTORY = "./comfyui_vpdsr/web"
_CORE = Path(__file__).resolve().parent / "vpdsr"


def _load_core() -> None:
    """Import the bundled core as ``vpdsr``, as if its parent folder were on ``sys.path``."""
    spec = importlib.util.spec_from_file_location(
        "vpdsr", _CORE / "__init__.py", submodule_search_locations=[str(_CORE)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["vpdsr"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["vpdsr"]
        raise


if __name__ == "vpdsr":
    # This checkout sits in a folder called "vpdsr" and a tool imported the folder as a package
    # under the core's name (pytest does so with its rootdir, which has this __init__.py). Hand the
    # name to the core, or every later `import vpdsr` would get this file instead.
    _load_core()


async def comfy_entrypoint():
    if "vpdsr" not in sys.modules:
        _load_core()
    from .comfyui_vpdsr.extension import comfy_entrypoint as entrypoint

    return await entrypoint()
