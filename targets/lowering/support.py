"""Pre-lowering support check: every op the TVM importer cannot convert, with its source line.

Runs on the decomposed `ExportedProgram` (what `from_exported_program` sees), so the answer
matches what lowering would hit — but all at once, instead of TVM's first assert.
"""
from __future__ import annotations

import torch

from graphopt.errors import Unsupported
from graphopt.source import node_source


def _importer_ops() -> set[str]:
    from tvm.relax.frontend.torch.exported_program_translator import (
        ExportedProgramImporter,
    )

    from graphopt.targets.lowering.converters import converters

    return {k for k in ExportedProgramImporter().convert_map if isinstance(k, str)} | set(converters())


def unsupported_ops(ep: torch.export.ExportedProgram) -> list[Unsupported]:
    known = _importer_ops()
    items, seen = [], set()
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if name in known:
            continue
        where = node_source(node)
        if (name, where) in seen:
            continue
        seen.add((name, where))
        items.append(Unsupported(f"operator {name}", where,
                                 "rewrite it with supported ops, or register a converter "
                                 "(custom_convert_map) for it"))
    return items
