"""What loading some exported models needs beyond transformers and torchao (pinned versions):
``import qcompare.compat`` before ``from_pretrained``. Model cards say when.

- torchao's ``IntxUnpackedToInt8Tensor`` implements ``F.linear`` but not the transposed products
  some modeling code uses: Falcon's ``FalconLinear`` computes ``input @ self.weight.T`` and the
  GPT-2 family's ``Conv1D`` computes ``torch.addmm(bias, x, weight)`` with the weight stored
  (in, out). Registered here: ``t``/``transpose``/``permute`` of a 2-D int tensor (the same codes
  with its group axis swapped) and ``mm``/``matmul``/``addmm`` with it on the right, computed by
  torchao's own ``F.linear`` on the untransposed tensor — the same numbers as the evaluated model;
  and ``W @ x`` with it on the left (Jamba's Mamba: ``dt_proj.weight @ time_step``), on its dequantized
  values as the fake-quantized student multiplied them. The torchao, GPTQ and AWQ converts import this
  module, so their converted models compute these products in the process that made them.
- transformers' ``FalconPreTrainedModel._init_weights`` reads ``module.weight`` unguarded, and a
  compressed-tensors ``FalconLinear`` holds ``weight_packed`` instead, so a GPTQ/AWQ Falcon
  checkpoint fails to load; the patch guards it as the generic ``_init_weights`` does.

- bitsandbytes' ``Linear4bit`` on a CPU with AVX512-BF16 repacks its weight on the first
  inference forward and then computes with activations rounded to bfloat16: not what the
  quantized model computed when it was trained and evaluated (measured: 3e-3 logits on a tiny
  model; and it fails outright when a block spans more than one row). Off here, so a reloaded
  NF4/FP4 model keeps bitsandbytes' portable dequantize → matmul path.
- bitsandbytes' CPU ``dequantize_4bit`` kernel (0.50.2) gives each row its own blocks, while its
  ``quantize_4bit`` (and the CUDA kernels, and the saved format) cut blocks from the flattened
  tensor: wherever a block spans rows (in_features not a multiple of blocksize) the weights come
  back wrong — 0.2–0.8 relative error where NF4 makes 0.09–0.11 (measured) — and the student, the
  converted model and a reload all agree on the wrong weights, so no check sees it. bitsandbytes'
  own portable implementation, the one its quantize matches, is registered for CPU instead.

- transformers' conversion mapping for some mixture-of-experts model types (``compat_scope.
  PER_EXPERT_LOADING``: IBM Granite's, Gemma 4's, Inkling's) has no converter from one Linear per expert — the layout of
  llm-compressor's compressed-tensors checkpoints — to the fused 3-D experts, so such a checkpoint loads
  with its experts left random. Registered here: the converter transformers ships for Qwen2-MoE
  (``experts.N.gate_proj``/``up_proj`` stacked and concatenated into ``gate_up_proj``, ``down_proj``
  stacked), beside the type's own renamings. Its patterns start at a module boundary (``\.experts``):
  unanchored, they also named Inkling's ``shared_experts``, a float module of its own, which saving then
  wrote under per-expert names that loaded as other weights.

All belong upstream (torchao, transformers, bitsandbytes); until then this module is what the card imports
(``qcompare.compat_scope`` says which checkpoints need it).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F


def _swapped(w):
    """A 2-D int tensor with its dimensions swapped: the same codes, the group axis swapped."""
    from torchao.quantization import IntxUnpackedToInt8Tensor as Intx

    return Intx(w.qdata.t(), w.scale.t(), w.zero_point.t(), w.target_dtype, tuple(reversed(w.block_size)), w.dtype,
                w.activation_quantization)


@functools.cache
def register_torchao_transposes() -> None:
    from torch.utils._python_dispatch import return_and_correct_aliasing
    from torchao.quantization import IntxUnpackedToInt8Tensor as Intx

    aten = torch.ops.aten

    def _only_2d(w):
        if w.ndim != 2:
            raise NotImplementedError("qcompare.compat transposes 2-D int tensors only")

    @Intx.implements([aten.t.default, aten.transpose.int, aten.permute.default])
    def _t(func, types, args, kwargs):
        _only_2d(args[0])
        return return_and_correct_aliasing(func, args, kwargs, _swapped(args[0]))

    @Intx.implements([aten.mm.default])
    def _mm(func, types, args, kwargs):
        return F.linear(args[0], _swapped(args[1]))

    @Intx.implements_torch_function([torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__])
    def _matmul(func, types, args, kwargs):
        a, b = args
        if isinstance(a, Intx) and a.ndim == 2 and not isinstance(b, Intx):
            # W @ x (Jamba's Mamba: dt_proj.weight @ time_step): the grid's values, multiplied as the
            # fake-quantized student multiplied them
            return torch.matmul(a.dequantize(), b)
        if isinstance(a, Intx) or b.ndim != 2:
            raise NotImplementedError("qcompare.compat: x @ W or W @ x with W a 2-D int tensor only")
        return F.linear(a, _swapped(b))

    def _addmm(bias, a, b, kwargs):
        if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or isinstance(a, Intx):
            raise NotImplementedError("qcompare.compat: addmm(bias, x, W) with W a 2-D int tensor only")
        return F.linear(a, _swapped(b), bias)

    @Intx.implements([aten.addmm.default])
    def _addmm_dispatch(func, types, args, kwargs):
        return _addmm(*args, kwargs)

    @Intx.implements_torch_function([torch.addmm])
    def _addmm_function(func, types, args, kwargs):
        return _addmm(*args, kwargs or {})


@functools.cache
def patch_falcon_init() -> None:
    from transformers import initialization as init
    from transformers.models.falcon import modeling_falcon as mf

    @torch.no_grad()
    def _init_weights(self, module):
        super(mf.FalconPreTrainedModel, self)._init_weights(module)  # the generic one guards .weight
        if isinstance(module, mf.FalconLinear) and getattr(module, "weight", None) is not None:
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)

    mf.FalconPreTrainedModel._init_weights = _init_weights


@functools.cache
def skip_initialising_compressed_layers() -> None:
    """Loading a compressed-tensors checkpoint runs the family's ``_init_weights`` over modules whose Linear
    layers are compressed (``weight_packed`` and ``weight_scale``, no ``weight``); GPTBigCode's reads
    ``c_proj.weight`` and the load fails. A module that holds compressed layers gets its values from the
    checkpoint: its initialisation is skipped where it reads a compressed layer's weight, which is not there
    (any other error is raised)."""
    from transformers.modeling_utils import PreTrainedModel

    original = PreTrainedModel._initialize_weights

    def _initialize_weights(self, module, *args, **kwargs):
        try:
            return original(self, module, *args, **kwargs)
        except AttributeError as e:  # only the read of a compressed layer's absent .weight, nothing else
            if getattr(e, "name", None) != "weight" or not hasattr(getattr(e, "obj", None), "weight_packed"):
                raise
            module._is_hf_initialized = True

    PreTrainedModel._initialize_weights = _initialize_weights


@functools.cache
def keep_bitsandbytes_portable() -> None:
    try:
        import bitsandbytes.nn.modules as modules
    except ImportError:  # no bitsandbytes model to load
        return
    modules.has_avx512bf16 = lambda: False  # what Linear4bit.__init__ reads for its CPU fast path


@functools.cache
def dequantize_bitsandbytes_blocks_flat() -> None:
    try:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code
    except ImportError:
        return
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # not torch.compile'd

    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        if A.dtype != torch.uint8:
            A = A.view(torch.uint8)
        return compute(A.reshape(-1), absmax, _get_4bit_code(quant_type, A.device), blocksize, shape, dtype)

    with warnings.catch_warnings():  # torch says it replaces bitsandbytes' CPU kernel: that is the point
        warnings.simplefilter("ignore")
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", dequantize_4bit)


@functools.cache
def register_per_expert_loading() -> None:
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

    from qcompare.compat_scope import PER_EXPERT_LOADING

    for model_type, layout in sorted(PER_EXPERT_LOADING.items()):
        own = get_checkpoint_conversion_mapping(model_type) or []
        register_checkpoint_conversion_mapping(model_type, own + _per_expert_converters(layout), overwrite=True)


def _per_expert_converters(layout: str) -> list:
    """``stacked``: gate_up_proj (E, 2I, H) is gate then up, down_proj (E, H, I), as Qwen2-MoE's loader
    rebuilds them. ``interleaved``: GPT-OSS's (E, H, 2I) with gate and up alternating along the last
    axis and a bias beside each weight, down_proj (E, I, H)."""
    from transformers.core_model_loading import Concatenate, Interleave, MergeModulelist, Transpose, WeightConverter

    # every pattern starts at a module boundary: "experts.down_proj" also names Inkling's shared_experts.down_proj
    # (a float 3-D weight of its own), which saving then wrote as per-expert names that load as something else
    pair = [r"\.experts.*.gate_proj.{}", r"\.experts.*.up_proj.{}"]
    if layout == "stacked":
        return [WeightConverter([p.format("weight") for p in pair], r"\.experts.gate_up_proj",
                                operations=[MergeModulelist(dim=0), Concatenate(dim=1)]),
                WeightConverter(r"\.experts.*.down_proj.weight", r"\.experts.down_proj", operations=[MergeModulelist(dim=0)])]
    return [WeightConverter([p.format("weight") for p in pair], r"\.experts.gate_up_proj",
                            operations=[MergeModulelist(dim=0), Concatenate(dim=1), Interleave(dim=1, inverse=True),
                                        Transpose(1, 2)]),
            WeightConverter([p.format("bias") for p in pair], r"\.experts.gate_up_proj_bias",
                            operations=[MergeModulelist(dim=0), Concatenate(dim=1), Interleave(dim=1, inverse=True)]),
            WeightConverter(r"\.experts.*.down_proj.weight", r"\.experts.down_proj",
                            operations=[MergeModulelist(dim=0), Transpose(1, 2)]),
            WeightConverter(r"\.experts.*.down_proj.bias", r"\.experts.down_proj_bias", operations=[MergeModulelist(dim=0)])]


register_torchao_transposes()
register_per_expert_loading()
patch_falcon_init()
skip_initialising_compressed_layers()
keep_bitsandbytes_portable()
dequantize_bitsandbytes_blocks_flat()
