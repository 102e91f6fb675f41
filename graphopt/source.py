"""Source locations of fx nodes: the user's own file and line, not torch internals."""
from __future__ import annotations

import os
import re

import torch

_TORCH_DIR = os.path.dirname(torch.__file__)
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def node_source(node: torch.fx.Node) -> str:
    """``file:line in func: code`` of the innermost frame outside torch, else the module path."""
    trace = node.meta.get("stack_trace") or ""
    frames = [m for m in _FRAME.finditer(trace) if not m.group(1).startswith(_TORCH_DIR)]
    if frames:
        f = frames[-1]
        return f"{f.group(1)}:{f.group(2)} in {f.group(3)}: {f.group(4).strip()}"
    stack = node.meta.get("nn_module_stack")
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        return f"module {path or '<root>'} ({cls_name.rsplit('.', 1)[-1]})"
    return f"node {node.name}"


def node_module(node: torch.fx.Node) -> str:
    """Dotted path of the innermost nn.Module that produced ``node`` ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # torch.export spells nested paths like "L['self'].layer1" in some versions; keep the dotted tail
    return re.sub(r"^L\['self'\]\.?", "", path)
