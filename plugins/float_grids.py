"""The float formats' side that imports torch, torchao and bitsandbytes (see
``qcompare_plugins.float_formats``): one ``Format`` per quantizer, holding

- ``round``: the library's quantize → dequantize of a weight (what its converter stores, read
  back), so the student's fake quantizer and the converted layer cannot drift;
- ``linear``: the product in the converted layer's own order (torchao's FP8 weight-only layer
  computes ``x @ W.T + b``, not ``F.linear``: different float rounding in bfloat16);
- ``convert``: the library's real layers, and ``save``: its transformers config.

The student's layers are ``FakeFloatLinear``: a Linear over the same Parameters whose weight
(and, for MXFP4, input) passes a ``FloatFakeQuantizer`` on the way in. Gradients pass straight
through an autograd function that returns the rounded tensor itself: ``w + (w_hat - w).detach()``
is not ``w_hat`` in floating point (measured: bitsandbytes FP4 differs on 11% of weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qcompare.sdk import FakeQuantizer, QcompareError, check_read_in_forward, find_targets, skip_patterns, unmatched


class _StraightThrough(torch.autograd.Function):
    """Forward: exactly the rounded tensor; backward: the gradient unchanged to the float one."""

    @staticmethod
    def forward(ctx, x, rounded):
        return rounded

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class FloatFakeQuantizer(nn.Module, FakeQuantizer):
    """Rounds a tensor with ``round`` (the library's own functions), straight-through gradients.

    The SDK's ``FakeQuantizer``: with ``enabled`` off, a weight-sharing student runs as its float
    teacher (``qcompare_plugins.distillers.shared_teacher``)."""

    def __init__(self, round_fn, label: str):
        super().__init__()
        self.round, self.config, self.enabled = round_fn, label, True

    def forward(self, x):
        if not self.enabled:
            return x
        return _StraightThrough.apply(x, self.round(x.detach()))


class FakeFloatLinear(nn.Linear):
    """A student Linear layer: ``format.linear(fake(x), fake(W), b)`` over the original Parameters."""

    def __init__(self, linear: nn.Linear, fmt: "Format"):
        with torch.device("meta"):
            super().__init__(linear.in_features, linear.out_features, linear.bias is not None,
                             dtype=linear.weight.dtype)
        self.weight, self.bias, self.product = linear.weight, linear.bias, fmt.linear
        self.original_class = type(linear)
        self.weight_fake_quantizer = FloatFakeQuantizer(fmt.round, fmt.label)
        self.activation_fake_quantizer = FloatFakeQuantizer(fmt.round_input, fmt.label) if fmt.activations else None

    def forward(self, x):
        w = self.weight_fake_quantizer(self.weight)
        if not self.weight_fake_quantizer.enabled:  # the float teacher's own product
            return F.linear(x, w, self.bias)
        if self.activation_fake_quantizer is not None:
            x = self.activation_fake_quantizer(x.reshape(-1, x.shape[-1])).reshape(x.shape)
        return self.product(x, w, self.bias)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    model.set_submodule(name, new)


def _unfake(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every ``FakeFloatLinear`` back to its original class over the same Parameters (as the
    model's own code builds it, so it saves and reloads as the model's layers); (name, layer)."""
    plain = []
    for name, m in list(model.named_modules()):
        if isinstance(m, FakeFloatLinear):
            with torch.device("meta"):
                layer = nn.Linear(m.in_features, m.out_features, m.bias is not None, dtype=m.weight.dtype)
            layer.__class__ = m.original_class  # a Linear subclass adds behaviour, not state
            layer.weight, layer.bias = m.weight, m.bias
            _replace(model, name, layer)
            plain.append((name, layer))
    return plain


class Format:
    """One float format; subclasses fill in the library's calls."""

    quantizer = ""  # the quantizer's name, for messages
    label = ""  # what the fake quantizers print as
    library = ""
    activations = False  # whether inputs are quantized too
    conv1d = False  # whether transformers' Conv1D layers (GPT-2 family) convert and reload

    def __init__(self, params):
        self.params = params

    # --- what each format defines ---

    def round(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def round_input(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, x, w, bias):
        return F.linear(x, w, bias)

    def check_shape(self, name: str, out_features: int, in_features: int) -> None:
        """Raise QcompareError when the format's blocks do not tile a layer."""

    def subclass_problem(self, target) -> str | None:
        """Why a Linear subclass cannot be converted (None: it can)."""
        if type(target.module).forward is not nn.Linear.forward:
            return (f"{type(target.module).__name__} ({target.name}) computes its own product with the weight, which "
                    f"{self.library}'s {self.label} tensor does not implement")
        return None

    def convert_layers(self, model: nn.Module, layers: list[tuple[str, nn.Linear]]) -> None:
        raise NotImplementedError

    def save(self, model: nn.Module, folder) -> None:
        raise NotImplementedError

    def student_dtype(self, model):
        return None  # keep the model's dtype

    # --- shared ---

    def targets(self, model: nn.Module):
        """The Linear (and, where the format takes them, Conv1D) layers to quantize; one clear
        line for what the format cannot take."""
        name, skip = self.quantizer, list(self.params.skip)
        experts = find_targets(model, skip, ("experts",))
        if experts:
            raise QcompareError(
                f"{name}: {type(experts[0].module).__name__} keeps its experts fused in 3-D weights "
                f"({experts[0].qualified}), which {self.library}'s {self.label} layers do not hold; the torchao "
                f'quantizer (integer grids) quantizes them, or leave them in float with skip = ["lm_head", '
                f'{skip_patterns((t.name for t in experts), model)}] '
                "and a lower min_coverage for this quantizer")
        conv1d = find_targets(model, skip, ("conv1d",))
        if conv1d and not self.conv1d:
            raise QcompareError(
                f"{name}: {type(model).__name__} keeps its weights in transformers' Conv1D layers (GPT-2 family, e.g. "
                f"{conv1d[0].name}), which {self.library}'s {self.label} tensors cannot be saved in (no transposed "
                "layout); the torchao and bnb quantizers handle this family")
        linears = find_targets(model, skip, ("linear",))
        if not linears and not conv1d:
            raise QcompareError(f"{name}: skip = {skip} leaves no Linear layer of the model to quantize; skip fewer "
                                "modules")
        for t in linears:
            problem = type(t.module) is not nn.Linear and self.subclass_problem(t)
            if problem:
                raise QcompareError(f"{name}: {problem}; leave those layers in float with skip, or use the torchao "
                                    "quantizer")
            self.check_shape(t.name, t.module.out_features, t.module.in_features)
        for t in conv1d:
            self.check_shape(t.name, t.weight.shape[1], t.weight.shape[0])
        check_read_in_forward(model, linears + conv1d, name)
        return linears, conv1d

    def prepare(self, model: nn.Module) -> nn.Module:
        import warnings

        for pattern in unmatched(model, self.params.skip):
            warnings.warn(f"{self.quantizer}: skip pattern {pattern!r} matches no module of the model", stacklevel=3)
        self.targets(model)
        if self.conv1d:
            from qcompare_plugins.torchao_grids import conv1d_to_linear

            conv1d_to_linear(model, self.params.skip)
        dtype = self.student_dtype(model)
        if dtype is not None:
            from qcompare_plugins.torchao_grids import cast_weights

            cast_weights(model, dtype)
        for t in find_targets(model, self.params.skip, ("linear",)):
            _replace(model, t.name, FakeFloatLinear(t.module, self))
        return model

    def convert(self, student: nn.Module) -> nn.Module:
        if not any(isinstance(m, FakeFloatLinear) for m in student.modules()):
            raise QcompareError(f"{self.quantizer}: convert needs a student made by {self.quantizer}'s prepare; this "
                                "model has no fake-quantized Linear layers")
        with torch.no_grad():
            self.convert_layers(student, _unfake(student))
        return student.eval()

    def skipped_linears(self, model: nn.Module) -> list[str]:
        """Names of the Linear and Conv1D layers the converted model keeps in float (transformers'
        skip lists, which otherwise default to leaving the output head alone)."""
        from transformers.pytorch_utils import Conv1D

        return [n for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, Conv1D)) and not _holds_codes(m.weight)]


def _holds_codes(w) -> bool:
    from qcompare.sdk import holds_codes

    return holds_codes(w)


# --- torchao: NVFP4, MXFP4, FP8 --------------------------------------------------------------


class TorchaoFormat(Format):
    library = "torchao"

    def config(self):
        raise NotImplementedError

    def convert_layers(self, model, layers):
        from torchao.quantization import quantize_

        chosen = {id(m) for _, m in layers}
        quantize_(model, self.config(), filter_fn=lambda m, fqn: id(m) in chosen)

    def save(self, model, folder) -> None:
        from transformers import TorchAoConfig

        from qcompare.sdk import save_quantized

        save_quantized(model, TorchAoConfig(self.config(), modules_to_not_convert=self.skipped_linears(model)), folder)


class NVFP4(TorchaoFormat):
    quantizer, label = "nvfp4", "NVFP4"

    def check_shape(self, name, out_features, in_features):
        if out_features % 16 or in_features % 16:
            raise QcompareError(f"nvfp4: {name} is {out_features}×{in_features}; NVFP4 needs both dimensions divisible "
                                "by 16 (its scale blocks); leave it in float with skip")

    def round(self, w):
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

        scale = per_tensor_amax_to_scale(torch.max(torch.abs(w))) if self.params.per_tensor_scale else None
        return NVFP4Tensor.to_nvfp4(w.contiguous(), per_tensor_scale=scale, is_swizzled_scales=True,
                                    act_quant_kwargs=None).dequantize(w.dtype)

    def config(self):
        from torchao.prototype.mx_formats import NVFP4WeightOnlyConfig

        return NVFP4WeightOnlyConfig(use_dynamic_per_tensor_scale=self.params.per_tensor_scale)


class MXFP4(TorchaoFormat):
    quantizer, label, activations = "mxfp4", "MXFP4", True
    BLOCK = 32

    def check_shape(self, name, out_features, in_features):
        if in_features % self.BLOCK:
            raise QcompareError(f"mxfp4: {name} has {in_features} input features; MXFP4 needs a multiple of 32 (its "
                                "scale blocks, over weights and activations alike); leave it in float with skip")

    def student_dtype(self, model):
        return torch.bfloat16  # torchao's MX layers compute in bfloat16 only: the student must see their numerics

    def _round(self, x):
        from torchao.prototype.mx_formats.mx_tensor import MXTensor, ScaleCalculationMode
        from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

        return MXTensor.to_mx(x.contiguous(), torch.float4_e2m1fn_x2, self.BLOCK, ScaleCalculationMode.RCEIL,
                              KernelPreference.EMULATED, is_swizzled_scales=True).dequantize(x.dtype)

    round = round_input = _round

    def linear(self, x, w, bias):
        """torchao's emulated MX product: 2-D ``mm``/``addmm`` of the dequantized operands."""
        rows = x.reshape(-1, x.shape[-1])
        out = torch.mm(rows, w.t()) if bias is None else torch.addmm(bias, rows, w.t())
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def config(self):
        from torchao.prototype.mx_formats import MXDynamicActivationMXWeightConfig
        from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

        return MXDynamicActivationMXWeightConfig(activation_dtype=torch.float4_e2m1fn_x2,
                                                 weight_dtype=torch.float4_e2m1fn_x2,
                                                 kernel_preference=KernelPreference.EMULATED)


class FP8(TorchaoFormat):
    quantizer, label = "fp8", "FP8"

    def _dtype(self):
        return torch.float8_e4m3fn if self.params.dtype == "e4m3" else torch.float8_e5m2

    def _granularity(self):
        from torchao.quantization import PerGroup, PerRow, PerTensor

        p = self.params
        return PerGroup(p.group_size) if p.group_size else PerRow() if p.granularity == "row" else PerTensor()

    def check_shape(self, name, out_features, in_features):
        g = self.params.group_size
        if g and in_features % g:
            raise QcompareError(f"fp8: group_size {g} does not divide the input features of {name} ({in_features}); "
                                "use a group size that divides it, or 0 (one scale per row)")

    def round(self, w):
        from torchao.quantization import Float8Tensor

        return Float8Tensor.from_hp(w, float8_dtype=self._dtype(), granularity=self._granularity()).dequantize()

    def linear(self, x, w, bias):
        """torchao's FP8 weight-only product: ``matmul(x, W.T)``, then ``+ b``."""
        out = torch.matmul(x, w.t())
        return out if bias is None else out + bias

    def config(self):
        from torchao.quantization import Float8WeightOnlyConfig

        return Float8WeightOnlyConfig(weight_dtype=self._dtype(), granularity=self._granularity(),
                                      set_inductor_config=False)


# --- bitsandbytes: NF4, FP4 ---------------------------------------------------------------------


class Bnb(Format):
    quantizer, library, conv1d = "bnb", "bitsandbytes", True

    def __init__(self, params):
        super().__init__(params)
        self.label = params.quant_type.upper()
        # bitsandbytes' CPU dequantize as its quantize cuts blocks (and its portable path): the student,
        # the converted layers and a reload (whose card imports it too) all compute with it
        from qcompare.sdk import compat  # noqa: F401

    def subclass_problem(self, target):
        # transformers' bitsandbytes integration makes Linear4bit of plain nn.Linear and Conv1D only
        return (f"{type(target.module).__name__} ({target.name}) is a Linear subclass, which transformers' "
                "bitsandbytes integration does not load as Linear4bit")

    def _quantize(self, w):
        import bitsandbytes.functional as bf

        p = self.params
        return bf.quantize_4bit(w.contiguous(), blocksize=p.blocksize, compress_statistics=p.double_quant,
                                quant_type=p.quant_type, quant_storage=torch.uint8)

    def round(self, w):
        import bitsandbytes.functional as bf

        return bf.dequantize_4bit(*self._quantize(w))

    def convert_layers(self, model, layers):
        from bitsandbytes.nn import Linear4bit, Params4bit

        p = self.params
        for name, layer in layers:
            w = layer.weight
            new = Linear4bit(layer.in_features, layer.out_features, layer.bias is not None, compute_dtype=w.dtype,
                             compress_statistics=p.double_quant, quant_type=p.quant_type, quant_storage=torch.uint8,
                             device="meta")
            new.weight = Params4bit(w.data.contiguous(), requires_grad=False, blocksize=p.blocksize,
                                    compress_statistics=p.double_quant, quant_type=p.quant_type,
                                    quant_storage=torch.uint8, module=new)._quantize(w.device)
            new.bias = layer.bias
            # bitsandbytes' AVX512-BF16 CPU path rounds activations to bfloat16: not what the student computed
            new.support_avx512bf16_for_cpu = False
            _replace(model, name, new)

    def save(self, model, folder) -> None:
        from transformers import BitsAndBytesConfig

        from qcompare.sdk import save_quantized

        p = self.params
        dtype = next(t for t in model.parameters() if t.is_floating_point()).dtype
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=p.quant_type,
                                    bnb_4bit_use_double_quant=p.double_quant, bnb_4bit_compute_dtype=dtype,
                                    bnb_4bit_quant_storage=torch.uint8,
                                    llm_int8_skip_modules=self.skipped_linears(model))
        save_quantized(model, config, folder)


FORMATS = {"nvfp4": NVFP4, "mxfp4": MXFP4, "fp8": FP8, "bnb": Bnb}
