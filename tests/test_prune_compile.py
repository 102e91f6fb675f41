"""Pruned models through `graphopt.compile`: host and emulated aarch64, report section, sparse storage."""
import json

import pytest
import torch
from conftest import require_tools

import graphopt
from graphopt.passes.manager import max_rel_error
from graphopt.zoo import ResidualCNN, mobilenet_blocks, recalibrate_bn


def test_compile_with_prune_on_host_matches_the_pruned_model():
    torch.manual_seed(0)
    x = (torch.randn(1, 3, 32, 32),)
    model = recalibrate_bn(ResidualCNN(width=48), x)
    config = graphopt.PruneConfig(target_macs=0.5)
    cm = graphopt.compile(model, x, "host", prune=config, progress=False)
    pruned = graphopt.prune(model, x, config, target="host")
    with torch.no_grad():
        assert max_rel_error(cm(*x), pruned.eval()(*x)) <= 1e-4
    p = cm.report.pruning
    assert p["config"]["channel_multiple"] == graphopt.get_target("host").channel_multiple
    assert cm.report.macs_before == p["macs"]["after"] and p["target"]["within_tolerance"]
    assert "## Pruning" in cm.report.to_markdown()
    assert json.loads(cm.report.to_json())["pruning"]["groups"]
    with pytest.raises(graphopt.ConfigError, match="PruneConfig"):
        graphopt.compile(model, x, "host", prune={"target_macs": 0.5}, progress=False)


@pytest.mark.emulation
def test_compile_pruned_sparse_model_for_arm_runs_under_emulation(tmp_path):
    require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    model, x = mobilenet_blocks()
    config = graphopt.PruneConfig(target_macs=0.6, sparsity=0.5, sparse_storage=True)
    cm = graphopt.compile(model, x, "arm", prune=config, verify=True, progress=False, count_instructions=False)
    p = cm.report.pruning
    assert p["config"]["channel_multiple"] == graphopt.get_target("arm").channel_multiple
    assert p["sparsity"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert p["sparse_storage"]["saved_bytes"] > 0 and "weights.sparse.npz" in cm.report.artifact_files
    assert cm.report.verification["max_rel_error"] <= 1e-4
    saved = cm.save(tmp_path / "art")
    assert (saved / "weights.sparse.npz").exists()
