"""The example quantizer passes the checks qcompare's runner makes of every quantizer."""

from qcompare.sdk import check_quantizer
from qcompare_rtn import RTNQuantizer
import pytest

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)


def test_rtn_trains_converts_exactly_covers_the_body_and_reloads(tmp_path):
    report = check_quantizer(RTNQuantizer, {"bits": 4, "group_size": 32}, folder=tmp_path,
                             layouts=("gqa", "fused-qkv", "tied-embeddings"),
                             refuse=("moe-experts", "conv1d"))  # what RTN does not handle, it says so
    assert report["gqa"]["size"]["bits_per_weight"] == 4 + 32 / 32  # int4 codes, an fp32 scale per 32
    assert "3-D expert weights" in report["moe-experts"]["refused"]


def test_the_registered_module_imports_no_torch_and_the_student_is_bit_exact():
    import subprocess
    import sys
    from pathlib import Path

    # what qcompare imports to list plugins and validate recipes stays light
    probe = "import sys, qcompare_rtn; sys.exit(2 if 'torch' in sys.modules else 0)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:] or "importing qcompare_rtn imported torch"

    import torch

    from qcompare_rtn.grids import fake_quantize, quantize_groups

    w = torch.randn(8, 64, requires_grad=True)
    codes, scale = quantize_groups(w.detach(), 4, 32)
    # the student's weight is the converted layer's, bit for bit, and the gradient passes straight through
    assert torch.equal(fake_quantize(w, 4, 32), (codes * scale).reshape(w.shape))
    g = torch.randn_like(w)
    assert torch.equal(torch.autograd.grad((fake_quantize(w, 4, 32) * g).sum(), w)[0], g)
