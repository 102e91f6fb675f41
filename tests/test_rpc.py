"""Device farms: tune through a TVM RPC tracker against an emulated aarch64 board, then compile.

A local tracker (127.0.0.1) and an emulated Cortex-A53 device (TVM's RPC server loop under
``qemu-aarch64 -cpu cortex-a53``) stand in for a board farm. Emulated timings are not real
speeds: the test checks the path (cross-compiled candidates uploaded, timed, recorded, applied),
never the numbers.
"""
import numpy as np
import pytest
import torch
from conftest import require_tools

import graphopt
from graphopt.targets.tuning.database import RECORDS
from graphopt.targets.tuning.rpc import EMULATED_NOTE, EmulatedDevice, LocalTracker

KEY = "emulated-a53"


@pytest.mark.emulation  # ~50 s: under the suite's 90 s line for `slow`
def test_tune_over_rpc_on_emulated_device_then_compile(tmp_path):
    require_tools("aarch64-linux-gnu-g++", "qemu-aarch64")
    torch.manual_seed(0)
    model, args = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval(), (torch.randn(2, 64),)
    spec = graphopt.get_target("arm-a53")
    db = tmp_path / "db"
    with LocalTracker() as tracker, EmulatedDevice(spec, tracker=(tracker.host, tracker.port), key=KEY):
        runner = graphopt.RPCRunner(tracker=tracker.address, key=KEY, session_timeout=120)
        summary = graphopt.tune(model, args, "arm-a53", trials=2, database=db, runner=runner, progress=False)
    (task,) = summary.tasks
    assert task.new_trials == 2 and task.best_seconds is not None and task.best_seconds < 1  # ran, not failed
    assert (db / RECORDS).read_text().count("\n") == 2
    assert summary.emulated and EMULATED_NOTE in summary.to_markdown()
    cm = graphopt.compile(model, args, "arm-a53", database=db, progress=False)
    lowering = cm.report.lowering
    assert task.default_seconds is not None  # graphopt's default schedule, measured on the same device
    assert (lowering["from_database"] == ["fused_matmul_add"]) == task.uses_tuned
    assert ([k["kernel"] for k in lowering["default_kept"]] == ["fused_matmul_add"]) != task.uses_tuned
    with torch.no_grad():
        np.testing.assert_allclose(cm(*args).numpy(), model(*args).numpy(), rtol=1e-5, atol=1e-5)


def test_bad_tracker_address_is_refused():
    with pytest.raises(graphopt.ConfigError, match="tracker"):
        EmulatedDevice(graphopt.get_target("arm-a53"), tracker="no-port", key=KEY)
    with pytest.raises(graphopt.ConfigError, match="qemu-user"):
        EmulatedDevice(graphopt.get_target("host"), tracker=("127.0.0.1", 9190), key=KEY)
