"""Tensor intrinsics are registered per use (`DotKernel.ensure_registered`): an fp32 compile registers
none and imports none of TVM's intrinsic modules; an int8 compile registers only the intrinsics of the
kernels its layers are tensorized with, and loads only that ISA's TVM module. Observed in a fresh
interpreter (registration is process-wide) through TVM's intrinsic registry and `sys.modules`.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent(r"""
    import json, sys
    import torch
    import graphopt
    from tvm import s_tir
    from graphopt.targets.lowering.kernels import builtin_kernels
    from graphopt.targets.spec import Feature

    NAMES = [k.intrin for k in builtin_kernels()] + ["dot_16x4_avx512", "dot_4x4_u8u8u32_udot"]

    def state(cm=None):
        loaded = [m for m in sys.modules if m.startswith("tvm.s_tir.tensor_intrin.")]
        return {"registered": sorted(n for n in NAMES if s_tir.TensorIntrin.get(n, allow_missing=True) is not None),
                "modules": sorted(m.rsplit(".", 1)[1] for m in loaded if getattr(sys.modules[m], "__file__", None)),
                "tensorized": cm.report.lowering["scheduled"].get("tensorized_dot", 0) if cm else 0}

    class Net(torch.nn.Module):  # every reduction a multiple of 16 channels: no layer needs a 4-channel kernel
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.Conv2d(32, 32, 1)
            self.fc = torch.nn.Linear(32, 16)
        def forward(self, x):
            x = torch.relu(self.c1(x))
            x = x + torch.relu(self.c2(x))
            return self.fc(x.mean((2, 3)))

    torch.manual_seed(0)
    x = torch.randn(1, 16, 8, 8)
    out = {"start": state()}
    kw = dict(progress=False, count_instructions=False, cache=False)
    out["fp32 host"] = state(graphopt.compile(Net().eval(), (x,), "host", **kw))
    q = graphopt.quantize(Net().eval(), (x,), [(torch.randn(1, 16, 8, 8),) for _ in range(2)])
    out["int8 arm-a55"] = state(graphopt.compile(q, (x,), "arm-a55", **kw))
    if graphopt.get_target("host").has(Feature.AVX512_VNNI):
        out["int8 host"] = state(graphopt.compile(q, (x,), "host", **kw))
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def states():
    run = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=900, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_fp32_compile_registers_no_intrinsic(states):
    assert states["start"] == states["fp32 host"] == {"registered": [], "modules": [], "tensorized": 0}


def test_int8_arm_a55_registers_only_the_indexed_sdot(states):
    from graphopt.targets.lowering import intrin_dotprod

    a55 = states["int8 arm-a55"]
    assert a55["tensorized"] >= 3  # both convs and the dense
    assert a55["registered"] == [intrin_dotprod.NAME]
    assert a55["modules"] == []  # TVM's Arm module (its 4×4 sdot, SME, ...) is not needed


def test_int8_host_adds_only_tvms_x86_vnni(states):
    from graphopt.targets.lowering import intrin_dotprod

    if "int8 host" not in states:
        pytest.skip("this host has no AVX512-VNNI")
    host = states["int8 host"]
    assert host["tensorized"] >= 3
    assert host["registered"] == sorted([intrin_dotprod.NAME, "dot_16x4_vnni", "dot_16x4_avx512"])  # x86 module's
    assert host["modules"] == ["x86"]
