"""NF3: a packed 3-bit lookup-table format, a worked example of a quantizer that ships a format of its own.

Each weight becomes one of 8 normal-float levels (the quantiles of a normal distribution, as NF4 has
16) times an absmax scale per group of 64 weights along the input features; the codes are packed 8
per 3 bytes and the scales stored in float16: 3 + 16/64 = 3.25 bits per weight, on disk as in memory.
transformers knows no such format, so the plugin saves it as itself and declares ``load``:
``qcompare.load_pretrained(folder)``, the reload check and ``qcompare export`` load the folder
through this plugin's entry point.

This module is what qcompare imports to list plugins and validate recipes, so it imports no torch:
the work is in ``qcompare_nf3.nf3``, imported by the methods that need it.
"""

from __future__ import annotations

from pydantic import Field

from qcompare.sdk import hookimpl, Params, Quantizer


class NF3Params(Params):
    group_size: int = Field(64, gt=0, multiple_of=8, description="weights sharing one float16 absmax scale, "
                            "along the input features (a multiple of 8: codes pack 8 per 3 bytes)")
    skip: list[str] = Field(["lm_head"], description="modules left in float: a glob, a name suffix or 're:<regex>'")


class NF3Quantizer(Quantizer):
    """3-bit normal-float lookup table, codes packed 8 per 3 bytes, saved and loaded as itself."""

    name = "nf3"
    Params = NF3Params

    def prepare(self, model, params, context):
        from . import nf3

        return nf3.prepare(model, params)

    def convert(self, student, params, context):
        from . import nf3

        return nf3.convert(student, params)

    def save(self, model, params, folder, context):
        """The format itself: ``config.json``, ``nf3.json`` (the packed layers) and
        ``qcompare_model.safetensors`` holding the packed codes (uint8), the float16 scales and every
        float tensor of the model."""
        from . import nf3

        nf3.save(model, folder)

    def load(self, folder, params):
        from . import nf3

        return nf3.load(folder)

    def check_model(self, model, params):
        from . import nf3

        nf3.targets(model, params)

    def fake_quant_tolerance(self, params):
        return 0.0  # the student's weight is the converted layer's, bit for bit

    def bits_per_weight(self, params):
        return 3 + 16 / params.group_size


@hookimpl
def register_quantizers(register):
    register(NF3Quantizer)
