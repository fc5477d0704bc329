"""The NF3 example saves its own format, loads it through its plugin, and passes qcompare's checks."""

import pytest

from qcompare.sdk import check_quantizer
from qcompare_nf3 import NF3Quantizer

pytestmark = pytest.mark.e2e  # runs whole cells, runs or commands (not in the fast subset)


def test_nf3_is_3_25_bits_in_memory_and_on_disk_and_reloads_exactly_through_the_plugin(tmp_path):
    report = check_quantizer(NF3Quantizer, {}, folder=tmp_path, layouts=("gqa", "fused-qkv", "tied-embeddings"),
                             refuse=("moe-experts", "conv1d"))  # what NF3 does not handle, it says so
    for layout in ("gqa", "fused-qkv", "tied-embeddings"):
        r = report[layout]
        assert r["size"]["bits_per_weight"] == 3 + 16 / 64  # 8 codes in 3 bytes, a float16 scale per 64
        assert r["saved_size"]["saved_bytes"] == r["saved_size"]["true_bytes"]  # shipped as measured
        assert r["fake_vs_converted"]["max_abs_diff"] == 0 and r["reload"]["max_abs_diff"] == 0
        saved = tmp_path / layout / "saved"
        assert (saved / "qcompare_format.json").is_file() and "quantization_config" not in (saved / "config.json").read_text()
    assert "3-D expert weights" in report["moe-experts"]["refused"]
    # transformers, which does not know the format, refuses the folder rather than fill it with random weights
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "gqa" / "saved")


def test_the_registered_module_imports_no_torch_and_the_format_round_trips():
    import subprocess
    import sys
    from pathlib import Path

    probe = "import sys, qcompare_nf3; sys.exit(2 if 'torch' in sys.modules else 0)"
    done = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:] or "importing qcompare_nf3 imported torch"

    import torch

    from qcompare_nf3.nf3 import LEVELS, _RoundThrough, dequantize, pack, quantize, unpack

    assert len(LEVELS) == 8 and LEVELS[0] == -1 and LEVELS[-1] == 1 and 0 in LEVELS.tolist()
    assert bool((LEVELS[1:] > LEVELS[:-1]).all())
    codes = torch.randint(0, 8, (5, 64))
    assert pack(codes).shape == (5, 24) and torch.equal(unpack(pack(codes)), codes)
    w = torch.randn(8, 128, requires_grad=True)
    c, scale = quantize(w, 64)
    # the student's weight is the packed layer's, bit for bit, and the gradient passes straight through
    assert torch.equal(_RoundThrough.apply(w, 64), dequantize(unpack(pack(c)), scale, torch.float32))
    g = torch.randn_like(w)
    assert torch.equal(torch.autograd.grad((_RoundThrough.apply(w, 64) * g).sum(), w)[0], g)
    # every weight sits on its nearest level
    x = (w.detach().reshape(8, 2, 64) / scale.float().unsqueeze(-1)).unsqueeze(-1)
    assert torch.equal((x - LEVELS.float()).abs().argmin(-1).reshape(8, 128), c)
