"""The training check tells a layer the loss cannot reach from one a fake quantizer cut off."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qcompare.sdk import checks


class Indexed(nn.Module):
    """``scores`` only chooses which input rows ``mix`` sees (a sparse-attention indexer's topk), so no
    loss reaches it; ``mix`` is trained."""

    def __init__(self, cut: bool = False):
        super().__init__()
        self.scores, self.mix, self.cut = nn.Linear(8, 1), nn.Linear(8, 8), cut

    def forward(self, x):
        keep = self.scores(x).squeeze(-1).topk(2, dim=-1).indices
        picked = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        if self.cut:  # a fake quantizer whose forward leaves the graph
            with torch.no_grad():
                return self.mix(picked)
        return self.mix(picked)

    def get_output_embeddings(self):  # no head: every Linear is the body
        return None


def train(model):
    watch = checks.TrainingWatch(model, model, adapters=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        if loss.requires_grad:  # the cut model's loss has no graph left
            loss.backward()
        opt.step()
    return watch


def test_a_layer_the_loss_cannot_reach_is_listed_not_failed():
    check = train(Indexed()).verdict(None)
    assert check["passed"] and check["unreachable"] == ["scores"] and check["reached"] == 1


def test_a_layer_whose_output_left_the_graph_still_fails():
    model = Indexed(cut=True)
    with pytest.raises(checks.CheckFailed, match=r"training: 1 of 2 layers .* never received a gradient .*\(e\.g\. mix\)"):
        train(model).verdict(None)
