"""The example quantizer passes the checks qcompare's runner makes of every quantizer."""

from qcompare.testing import check_quantizer
from qcompare_rtn import RTNQuantizer


def test_rtn_trains_converts_exactly_covers_the_body_and_reloads(tmp_path):
    report = check_quantizer(RTNQuantizer, {"bits": 4, "group_size": 32}, folder=tmp_path,
                             layouts=("gqa", "fused-qkv", "tied-embeddings"),
                             refuse=("moe-experts", "conv1d"))  # what RTN does not handle, it says so
    assert report["gqa"]["size"]["bits_per_weight"] == 4 + 32 / 32  # int4 codes, an fp32 scale per 32
    assert "3-D expert weights" in report["moe-experts"]["refused"]
