"""The training check tells a layer the loss cannot reach from one a fake quantizer cut off."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qcompare.sdk import checks


class CutLinear(nn.Linear):
    """A fake quantizer whose forward leaves the autograd graph."""

    def forward(self, x):
        with torch.no_grad():
            return super().forward(x)


class Indexed(nn.Module):
    """``scores`` only chooses which input rows ``mix`` sees (a sparse-attention indexer's topk), and
    ``gate`` runs only in the model's own no-grad code: no loss reaches either; ``mix`` and ``out`` are trained."""

    def __init__(self, cut: bool = False):
        super().__init__()
        self.scores, self.gate = nn.Linear(8, 1), nn.Linear(8, 1)
        self.mix = CutLinear(8, 8) if cut else nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        keep = self.scores(x).squeeze(-1).topk(2, dim=-1).indices
        with torch.no_grad():
            keep = keep + (self.gate(x).squeeze(-1)[:, :2] > 1e9).long()  # transformers' @torch.no_grad code
        picked = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        return self.out(self.mix(picked))

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
    assert check["passed"] and check["unreachable"] == ["scores", "gate"] and check["reached"] == 2


def test_a_layer_whose_output_left_the_graph_still_fails():
    with pytest.raises(checks.CheckFailed, match=r"training: 1 of 4 layers .* never received a gradient .*\(e\.g\. mix\)"):
        train(Indexed(cut=True)).verdict(None)


def test_no_layer_is_excused_when_none_was_trained():
    model = Indexed()
    watch = checks.TrainingWatch(model, model, adapters=False)
    with torch.no_grad():
        model(torch.randn(3, 5, 8))  # forwards, no backward: a distiller that never trained
    with pytest.raises(checks.CheckFailed, match=r"training: 4 of 4 layers .* never received a gradient"):
        watch.verdict(None)
