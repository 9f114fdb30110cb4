"""distillpp's ComfyUI node pack: teacher guidance (Distillation++) for few-step distilled students.

Copy or link this folder into ``ComfyUI/custom_nodes/`` and ``pip install distillpp`` into ComfyUI's
Python environment (see ../README.md). ``core`` holds the ComfyUI-independent logic; ``nodes`` the nodes.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
