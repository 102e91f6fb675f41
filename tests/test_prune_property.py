"""Property test: on random CNN graphs (residual adds, concat, depthwise/grouped convs, chunk, pooling,
flatten or mean heads) and random budgets, pruning never crashes and the float64 oracle holds."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prune_oracle import assert_oracle
from torch import nn

import graphopt
from graphopt.zoo import recalibrate_bn

BLOCKS = ("conv", "residual", "concat", "depthwise", "grouped", "chunk_mul", "pool")


class RandomCNN(nn.Module):
    def __init__(self, spec: list[tuple[str, int]], head: str, size: int):
        super().__init__()
        self.spec, self.head_kind = spec, head
        self.layers = nn.ModuleList()
        c = 3
        for kind, width in spec:
            if kind == "conv":
                m = nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
                c = width
            elif kind == "residual":
                m = nn.Sequential(nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
            elif kind == "concat":
                m = nn.Sequential(nn.Conv2d(c, width, 1), nn.ReLU())
                c = c + width
            elif kind == "depthwise":
                m = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1, groups=c), nn.BatchNorm2d(2 * c), nn.ReLU6())
                c = 2 * c
            elif kind == "grouped":
                m = nn.Conv2d(c, 2 * width, 3, padding=1, groups=2) if c % 2 == 0 else nn.Conv2d(c, 2 * width, 1)
                c = 2 * width
            elif kind == "chunk_mul":
                m = nn.Conv2d(c, 2 * width, 1)
                c = width
            else:
                m = nn.MaxPool2d(2) if size >= 4 else nn.Identity()
                size = size // 2 if size >= 4 else size
            self.layers.append(m)
        self.fc = nn.Linear(c * size * size if head == "flatten" else c, 4)

    def forward(self, x):
        for (kind, _), m in zip(self.spec, self.layers, strict=True):
            if kind == "residual":
                x = torch.relu(x + m(x))
            elif kind == "concat":
                x = torch.cat([x, m(x)], 1)
            elif kind == "chunk_mul":
                a, b = m(x).chunk(2, 1)
                x = a * torch.sigmoid(b)
            else:
                x = m(x)
        return self.fc(torch.flatten(x, 1) if self.head_kind == "flatten" else x.mean((2, 3)))


specs = st.lists(st.tuples(st.sampled_from(BLOCKS), st.sampled_from([4, 6, 8])), min_size=1, max_size=4)
budgets = st.one_of(st.tuples(st.just("ratio"), st.floats(0.1, 0.8)),
                    st.tuples(st.just("target_macs"), st.floats(0.3, 0.9)),
                    st.tuples(st.just("target_params"), st.floats(0.3, 0.9)))


@pytest.mark.filterwarnings("ignore:graphopt.prune")
@settings(max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=specs, head=st.sampled_from(["flatten", "mean"]), budget=budgets, multiple=st.sampled_from([1, 2, 4]),
       criterion=st.sampled_from(["l1", "l2"]))
def test_random_cnn_oracle(spec, head, budget, multiple, criterion):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 8, 8),)
    model = recalibrate_bn(RandomCNN(spec, head, 8), x)
    pruned = graphopt.prune(model, x, criterion=criterion, channel_multiple=multiple, **{budget[0]: budget[1]})
    report = pruned.graphopt_pruning
    if report.plan:
        assert_oracle(model, pruned, x)
    else:
        assert report.macs_after == report.macs_before
