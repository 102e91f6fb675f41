"""The compile report: what happened to the model, with numbers.

`to_dict()` is stable JSON (sorted keys, plain types, a schema version); `to_markdown()` is for
people. Declined rewrites and fallbacks are listed, never hidden.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from graphopt.pipeline import PassRecord

SCHEMA_VERSION = 1


def _fmt_int(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, div in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _pruning_lines(p: dict) -> list[str]:
    macs, params, target = p.get("macs", {}), p.get("params", {}), p.get("target") or {}
    lines = [f"- MACs: {_fmt_int(macs.get('before'))} → {_fmt_int(macs.get('after'))}, "
             f"params: {_fmt_int(params.get('before'))} → {_fmt_int(params.get('after'))}"]
    if "metric" in target:
        line = f"- target: {target['metric']} × {target['fraction']}, achieved {target['achieved']}"
        if not target["within_tolerance"]:
            lim = target.get("limit")
            line += f" — **budget not met** (±{target.get('tolerance')})" + (
                f": {lim['reason']}; reachable minimum {lim['reachable_min']}, unprunable share "
                f"{lim['unprunable_share']}, held by minimum channels {lim['minimum_channels_share']}, declined "
                f"groups {lim['declined_groups']}, smallest step {lim['smallest_step']}" if lim else "")
        lines.append(line)
    if p.get("sparsity"):
        lines.append(f"- magnitude sparsity: {p['sparsity'].get('sparsity')}")
    if p.get("sparse_storage"):
        s = p["sparse_storage"]
        lines.append(f"- sparse weights file: {_fmt_bytes(s['sparse_bytes'])} vs {_fmt_bytes(s['dense_bytes'])} dense "
                     f"(saves {_fmt_bytes(s['saved_bytes'])}; storage only, dense kernels are not faster)")
    lines += [f"- {n}" for n in p.get("notes", [])]
    groups = p.get("groups", [])
    if groups:
        lines += ["", "| group | producers | channels | MACs | params | kept because |", "|---|---|---|---|---|---|"]
        for g in groups:
            lines.append(f"| {g['id']} | {', '.join(g['producers'])} | {g['channels_before']} → {g['channels_after']} "
                         f"| {_fmt_int(g['macs_before'])} → {_fmt_int(g['macs_after'])} "
                         f"| {_fmt_int(g['params_before'])} → {_fmt_int(g['params_after'])} | {'; '.join(g['reasons'])} |")
    return lines


def _layer_lines(layers: list[dict]) -> list[str]:
    """The per-call table of a C library: instructions, flash (code shared by equal kernels, weights),
    RAM live during the call, and the weight storage chosen."""
    if not layers:
        return []
    lines = ["", "### Layers (kernel calls)", "",
             "| # | layer / kernel | instructions | code B (calls sharing it) | weights B | RAM live B "
             "| weight storage |",
             "|---|---|---|---|---|---|---|"]
    for r in layers:
        code = "–" if r.get("code_bytes") is None else r["code_bytes"]
        storage = f"{r['weight_storage']} ({r['storage_reason']})" if r.get("weight_storage") else "–"
        lines.append(f"| {r['call']} | {r.get('layer') or r['kernel'][:48]} | {_fmt_int(r.get('instructions'))} | "
                     f"{code} ({r['calls_sharing_kernel']}) | {r['weight_bytes']} | {r['ram_live_bytes']} "
                     f"| {storage} |")
    return lines


def _error_text(rewrite: dict) -> str:
    return "exact" if rewrite["exact"] else f"{rewrite['max_error']:.1e}"


@dataclass
class Report:
    model: str
    target: dict
    capture_method: str = ""
    capture_fallback_reason: str | None = None
    params_before: int | None = None
    params_after: int | None = None
    param_bytes_after: int | None = None
    macs_before: int | None = None
    macs_after: int | None = None
    macs_by_module: dict = field(default_factory=dict)
    macs_by_precision: dict = field(default_factory=dict)  # after: "fp32", "w8a8", "w4a8", "w1a1", …
    passes: list[PassRecord] = field(default_factory=list)
    lowering: dict = field(default_factory=dict)
    artifact_files: dict = field(default_factory=dict)  # name -> bytes
    timings: dict = field(default_factory=dict)  # phase -> seconds
    instructions_per_inference: int | None = None
    instructions_note: str | None = None
    verification: dict = field(default_factory=dict)  # e.g. {"max_rel_error": ..., "runs_on": ...}
    warnings: list[str] = field(default_factory=list)
    pruning: dict = field(default_factory=dict)  # graphopt.PruneReport.to_dict() when compile(prune=...)
    legalized: list = field(default_factory=list)  # operator-set rewrites: {node, where, rewrite, exact, max_error}

    @property
    def quantization(self) -> dict:
        """What QDQ folding made integer, and weight storage (bytes, low-bit packed) vs. fp32; {} if nothing."""
        stats = next((p.stats for p in self.passes if p.name == "fold-qdq" and p.modified), None)
        if not stats or "weight_bytes" not in stats:
            return {}
        return {**stats, "weight_size_ratio": round(stats["weight_bytes_fp32"] / max(stats["weight_bytes"], 1), 2)}

    @property
    def declined(self) -> list:
        return [d for p in self.passes for d in p.declined]

    @property
    def artifact_bytes(self) -> int:
        return sum(self.artifact_files.values())

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "target": self.target,
            "capture": {"method": self.capture_method, "fallback_reason": self.capture_fallback_reason},
            "params": {"before": self.params_before, "after": self.params_after, "bytes_after": self.param_bytes_after},
            "macs": {"before": self.macs_before, "after": self.macs_after, "by_module": self.macs_by_module,
                     "by_precision": self.macs_by_precision},
            "passes": [p.to_dict() for p in self.passes],
            "declined": [d.to_dict() for d in self.declined],
            "lowering": self.lowering,
            "artifact": {"files": self.artifact_files, "bytes": self.artifact_bytes},
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "instructions_per_inference": self.instructions_per_inference,
            "instructions_note": self.instructions_note,
            "verification": self.verification,
            "warnings": list(self.warnings),
            "pruning": self.pruning,
            "legalized": list(self.legalized),
            "quantization": self.quantization,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)

    def to_markdown(self) -> str:
        t = self.target
        lines = [f"# graphopt report: {self.model} → {t.get('name')}", "",
                 f"- target: {t.get('description', '')} (`{json.dumps(t.get('tvm_target'))}`)",
                 f"- capture: {self.capture_method}"
                 + (f" (torch.export failed: {self.capture_fallback_reason})" if self.capture_fallback_reason else ""),
                 f"- params: {_fmt_int(self.params_before)} → {_fmt_int(self.params_after)}"
                 f" ({_fmt_bytes(self.param_bytes_after)})",
                 f"- MACs: {_fmt_int(self.macs_before)} → {_fmt_int(self.macs_after)}"
                 + (f" ({', '.join(f'{k} {_fmt_int(v)}' for k, v in sorted(self.macs_by_precision.items()))})"
                    if set(self.macs_by_precision) - {"fp32"} else ""),
                 f"- artifact: {_fmt_bytes(self.artifact_bytes)} in {len(self.artifact_files)} files"]
        if self.instructions_per_inference is not None:
            lines.append(f"- instructions per inference (QEMU, {t.get('qemu', {}).get('cpu')}): "
                         f"{_fmt_int(self.instructions_per_inference)}")
        elif self.instructions_note:
            lines.append(f"- instructions per inference: not measured ({self.instructions_note})")
        if self.verification:
            lines.append("- verification: " + ", ".join(f"{k}={v}" for k, v in self.verification.items()))
        lines += ["", "## Passes", "", "| pass | modified | time | stats |", "|---|---|---|---|"]
        for p in self.passes:
            stats = ", ".join(f"{k}={v}" for k, v in p.stats.items() if not isinstance(v, dict))
            lines.append(f"| {p.name} | {'yes' if p.modified else 'no'} | {p.seconds * 1e3:.1f} ms | {stats} |")
        q = self.quantization
        if q:
            packed = ", ".join(f"{k.removeprefix('packed_')} packed: {v}" for k, v in q.items() if k.startswith("packed_"))
            lines += ["", "## Quantization", "",
                      f"- integer weights: {_fmt_bytes(q['weight_bytes'])} vs fp32 {_fmt_bytes(q['weight_bytes_fp32'])}"
                      f" ({q['weight_size_ratio']}x smaller{'; ' + packed + ' layer(s)' if packed else ''})",
                      f"- folded into integer ops: {q['folded']} quantize node(s)"]
            if "float_ops" in q:
                kinds = ", ".join(f"{k} {v}" for k, v in sorted(q["float_ops_by_kind"].items()))
                lines.append(f"- float ops between quantize and dequantize: {q['float_ops']}"
                             + (f" ({kinds}; why: Declined rewrites)" if kinds else ""))
        declined = self.declined
        lines += ["", f"## Declined rewrites ({len(declined)})", ""]
        lines += [f"- **{d.pass_name}** `{d.node}` at {d.where}: {d.reason}" for d in declined] or ["- none"]
        ops = t.get("ops") or {}
        if self.legalized or (ops and not ops.get("unrestricted")):
            lines += ["", f"## Legalized for the {ops.get('name', '?')} operator set ({len(self.legalized)})", ""]
            if self.legalized:
                lines += ["| node | rewrite | max error | source |", "|---|---|---|---|"]
                lines += [f"| {r['node']} | {r['rewrite']} | {_error_text(r)} | {r['where']} |" for r in self.legalized]
            else:
                lines.append("- nothing to rewrite: every node runs as captured")
        if self.lowering:
            lines += ["", "## Lowering", ""]
            for k, v in self.lowering.items():
                if k != "layers":
                    lines.append(f"- {k}: {json.dumps(v, default=str) if isinstance(v, (dict, list)) else v}")
            lines += _layer_lines(self.lowering.get("layers") or [])
        if self.pruning:
            lines += ["", "## Pruning", ""] + _pruning_lines(self.pruning)
        lines += ["", "## Timings", ""] + [f"- {k}: {v:.2f} s" for k, v in self.timings.items()]
        if self.warnings:
            lines += ["", "## Warnings", ""] + [f"- {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_markdown()
