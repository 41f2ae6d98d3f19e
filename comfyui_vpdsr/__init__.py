"""ComfyUI nodes for vpdsr: Load VPD Model, One-Step SR, Load CLIP and the CLIP Semantic Inspector.

ComfyUI loads them through the repository's top-level ``__init__.py``; ``extension.py`` holds the
entry point. Importing this package alone needs no ComfyUI, so tools that walk the repository
(pytest, packaging) can import it safely.
"""

WEB_DIRECTORY = "web"  # help pages in web/docs/<NodeId>.md, relative to this package
