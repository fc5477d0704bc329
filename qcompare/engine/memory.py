"""A cell's peak memory on its device, estimated before the run from the model's sizes (its
config, no weights loaded) and the distiller's parameters; ``qcompare plan`` shows it and says
which recipe change would make a cell fit.

An estimate, not a measurement: it counts what a training step holds at once, part by part, in
bytes (N parameters, w bytes per weight: 2 on a GPU, where the runner loads bf16; 4 on CPU, float32;
e bytes per activation, the same; b = per_device_train_batch_size, s = max_length):

- teacher weights N·w; the student's own weights N·w, or none where its weights are the teacher's
  (a LoRA student of a quantizer whose ``shares_teacher_weights`` is true);
- full fine-tuning at w < 4 trains on fp32 master weights (``fp32_master_weights``): 4·N, fp32
  gradients 4·N, and the bf16 student copy is gone; LoRA trains P adapter parameters (fp32) only;
- AdamW keeps 2 fp32 states per trainable parameter (8 bytes; 2 with ``optimizer = "adamw_8bit"``);
- rounded weights: each fake-quantized Linear computes its rounded weight in the compute dtype and
  its backward needs it, so the forward keeps one per Linear (body parameters · e; one layer's
  with gradient checkpointing);
- activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models", Table 2, adapted): their 34·s·b·h bytes per layer at 2 bytes, no recomputation, counts
  layer-norm inputs 4sbh, attention 11sbh + 5·a·s²·b, MLP 19sbh. Here flash/SDPA attention keeps no
  s² scores, there is no dropout, K and V are kv_heads/heads of Q (GQA), and the SwiGLU MLP keeps
  gate, up, SiLU(gate) and their product at the intermediate size I. Per token per layer:
      E = 4·h (two RMSNorm inputs, the QKV and the MLP input) + 2·q (Q, attention output; q = heads·head_dim)
          + 2·kv (K, V; kv = kv_heads·head_dim) + 4·I
  activations = A·L·E·b·s·e; with gradient checkpointing 2·L·h·b·s·e (each layer's input and what
  is held beside it) + A·E·b·s·e (the layer being recomputed). A = ``ACTIVATION_FACTOR`` covers what
  the formula leaves out (RMSNorm's fp32 internals, Qwen3's q/k norms, K and V repeated to all heads
  for SDPA, an fp32 residual stream beside fp32 masters): measured 1.63 (bf16 weights) and 1.84
  (fp32 masters under bf16 autocast) on Qwen3-4B's shapes, 1.40 in fp32 (bench/memory_probe.py);
- the loss over the vocabulary V: the tiled loss (GKD's default ``loss_kernel = "chunked"``, and
  SFT through TRL's fused LM head) holds two fp32 tiles of ``TILE_TOKENS`` × ``TILE_VOCAB`` and, in
  backward, fp32 gradients of the head's weight (V·h) and of the hidden states (b·s·h); GKD's
  ``loss_kernel = "full"`` holds ``JSD_LOSS_TENSORS`` fp32 [b, s, V] tensors at its peak;
- on-policy rollouts (λ > 0): one copy of the student's weights in the teacher's dtype, N·w, and a
  static KV cache 2·L·kv·b·(s + max_new_tokens)·w (prompts bucketed, at most s tokens);
- CUDA context and allocator slack: 1 GiB + 5% of the rest.

Every part is counted as held at once, though gradients are allocated only as the backward frees
activations: the estimate errs high. On an H200 (bench/memory_probe.py, Qwen3-4B's shapes, batch
4 × 384, λ = 0, no fake quantizer) two whole steps peaked at 84 GiB allocated for full fine-tuning
on fp32 masters (estimate 92 before overhead) and 31 GiB for LoRA r = 16 over the teacher's
weights (estimate 33).

Not counted: the teacher's forward (no gradients: one layer at a time), evaluation, a GPTQ/AWQ
calibration pass and the teacher cache (``teacher_cache_max_gb``, host memory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

GIB = 2**30
OVERHEAD_BYTES, OVERHEAD_SHARE = GIB, 0.05
# fp32 [b, s, V] tensors at the full-vocabulary loss's peak: TRL's generalized JSD, 15 measured
# (bench/memory_probe.py), + the student's and teacher's bf16 logits
JSD_LOSS_TENSORS = 16
ACTIVATION_FACTOR = 1.75  # measured / E (see above)
TILE_TOKENS, TILE_VOCAB = 4096, 32768  # the tiles of TRL 1.16's chunked divergence and log-prob kernels
ASSUMED_GPU_GIB = 80
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shapes:
    """The sizes of a decoder-only transformer that set its memory."""

    parameters: int
    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool = False

    @property
    def body_parameters(self) -> int:
        """Parameters besides the embeddings and the output head (the Linear layers, near enough)."""
        return max(self.parameters - self.vocab * self.hidden * (1 if self.tied else 2), 0)

    @classmethod
    def from_config(cls, config: dict, parameters: int) -> Shapes | None:
        """From a config.json (a multimodal one's ``text_config``); None where a size is missing."""
        text = config.get("text_config") or config
        get = lambda *keys: next((text[k] for k in keys if text.get(k) is not None), None)  # noqa: E731
        hidden, layers = get("hidden_size", "n_embd", "d_model"), get("num_hidden_layers", "n_layer", "num_layers")
        heads, vocab = get("num_attention_heads", "n_head"), get("vocab_size")
        if None in (hidden, layers, heads, vocab):
            return None
        inter = get("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
        if get("moe_intermediate_size") and get("num_experts_per_tok"):  # a token goes through top-k experts
            inter = get("moe_intermediate_size") * get("num_experts_per_tok")
        return cls(int(parameters), hidden, layers, vocab, inter, heads, get("num_key_value_heads") or heads,
                   get("head_dim") or hidden // heads,
                   bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))))


def layer_activation_elements(m: Shapes) -> int:
    """E: the values one decoder layer keeps for backward per token (see the module's docstring)."""
    return 4 * m.hidden + 2 * m.heads * m.head_dim + 2 * m.kv_heads * m.head_dim + 4 * m.intermediate


def lora_parameters(m: Shapes, r: int, targets: str = "all-linear") -> int:
    """r·(in + out) per wrapped Linear of each layer (peft's ``all-linear`` leaves the head alone)."""
    q, kv, h, i = m.heads * m.head_dim, m.kv_heads * m.head_dim, m.hidden, m.intermediate
    sizes = {"q_proj": h + q, "k_proj": h + kv, "v_proj": h + kv, "o_proj": q + h,
             "gate_proj": h + i, "up_proj": h + i, "down_proj": i + h}
    names = [t.strip() for t in targets.split(",")] if targets.strip() != "all-linear" else LINEARS
    wrapped = [sizes[n] for n in names if n in sizes] or list(sizes.values())  # other names: as all-linear
    return r * m.layers * sum(wrapped)


@dataclass
class Memory:
    """A cell's expected peak, in bytes, by part (overhead included in ``peak``)."""

    parts: dict[str, float]
    device: str
    notes: list[str] = field(default_factory=list)

    @property
    def overhead(self) -> float:
        return OVERHEAD_BYTES + OVERHEAD_SHARE * sum(self.parts.values())

    @property
    def peak(self) -> float:
        return sum(self.parts.values()) + self.overhead

    def biggest(self, n: int = 3) -> list[tuple[str, float]]:
        return sorted(((k, v) for k, v in self.parts.items() if v), key=lambda kv: -kv[1])[:n]

    def as_record(self) -> dict:
        return {"peak_bytes": int(self.peak), "parts": {k: int(v) for k, v in self.parts.items()},
                "overhead_bytes": int(self.overhead)}


def cell_memory(m: Shapes, params=None, *, device: str = "cuda", shares_weights: bool = False) -> Memory:
    """The expected peak of a cell of model ``m`` whose distiller has ``params`` (None or no
    ``per_device_train_batch_size``: nothing trains). ``shares_weights``: the student's base weights
    are the teacher's (``Quantizer.shares_teacher_weights`` and ``Distiller.keeps_base_weights``)."""
    w = 4 if device == "cpu" else 2  # the runner loads float32 on CPU, bf16 on a GPU (qcompare.engine.inputs)
    e, n = w, m.parameters
    parts = {"teacher weights": n * w, "student weights": 0 if shares_weights else n * w}
    if params is None or not hasattr(params, "per_device_train_batch_size"):
        return Memory(parts, device, ["no training: weights only (evaluation not counted)"])
    b, s = params.per_device_train_batch_size, params.max_length
    r, ckpt = getattr(params, "lora_r", 0), getattr(params, "gradient_checkpointing", False)
    if r:
        trainable = lora_parameters(m, r, getattr(params, "lora_targets", "all-linear"))
        parts["student weights"] += 4 * trainable  # the adapters, fp32
    else:
        trainable = n
        if w < 4:  # fp32 masters replace the student's bf16 weights
            parts["student weights"], parts["fp32 master weights"] = 0, 4 * n
    parts["gradients"] = 4 * trainable
    parts["optimizer states"] = (2 if getattr(params, "optimizer", "adamw") == "adamw_8bit" else 8) * trainable
    parts["rounded weights"] = m.body_parameters * e / (m.layers if ckpt else 1)
    per_layer = layer_activation_elements(m) * b * s * e
    per_layer *= ACTIVATION_FACTOR
    parts["activations"] = (2 * m.layers * m.hidden * b * s * e + per_layer) if ckpt else m.layers * per_layer
    distills = hasattr(params, "lmbda")
    tiled = getattr(params, "tiled_loss", None)
    if tiled is None or tiled(device, m.vocab):  # SFT: TRL's fused LM head is always tiled
        parts["loss"] = tiled_loss_bytes(b * s, m.vocab, m.hidden)
    else:
        parts["loss"] = JSD_LOSS_TENSORS * 4 * b * s * m.vocab
    if distills and params.lmbda > 0:
        cache = 2 * m.layers * m.kv_heads * m.head_dim * b * (s + params.max_new_tokens) * w
        parts["rollouts"] = n * w + cache
    return Memory(parts, device)


def tiled_loss_bytes(tokens: int, vocab: int, hidden: int) -> int:
    """What the tiled loss holds at its peak (backward): two fp32 tiles and the fp32 gradients of the
    head's weight and of the hidden states."""
    return 4 * (2 * min(tokens, TILE_TOKENS) * min(vocab, TILE_VOCAB) + vocab * hidden + tokens * hidden)


def device_capacity(device: str, gpu_memory_gib: float | None = None) -> tuple[float, str]:
    """(bytes, label): the memory a cell may use on ``device``: on cuda ``gpu_memory_gib`` when
    given, else the first GPU's (when one is here), else an assumed 80 GiB; on cpu this machine's RAM."""
    if device == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"
    if gpu_memory_gib:
        return gpu_memory_gib * GIB, f"a {gpu_memory_gib:g} GiB GPU (--gpu-memory)"
    if os.path.exists("/proc/driver/nvidia/version"):  # import torch only where a GPU may answer
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return props.total_memory, f"{props.name}, {props.total_memory / GIB:.0f} GiB"
    return ASSUMED_GPU_GIB * GIB, f"assumed {ASSUMED_GPU_GIB} GiB GPU (--gpu-memory sets it)"


def fixes(m: Shapes, params, capacity: float, *, device: str = "cuda", shares_weights: bool = False,
          lora_shares: bool = False) -> list[str]:
    """The recipe changes that would each, by this estimate, bring the cell under ``capacity``, in
    the order to try them; where no one change is enough, the fewest of them that together are
    (one entry joined by " + "). ``lora_shares``: with LoRA the student would share the teacher's weights."""
    if params is None or not hasattr(params, "per_device_train_batch_size"):
        return []
    changes = []  # (text, update) in the order to try
    if not params.lora_r:
        changes.append(("lora_r = 16", {"lora_r": 16}))
    if not params.gradient_checkpointing:
        changes.append(("gradient_checkpointing = true", {"gradient_checkpointing": True}))
    if "optimizer" in type(params).model_fields and getattr(params, "optimizer", "adamw") != "adamw_8bit":
        changes.append(('optimizer = "adamw_8bit"', {"optimizer": "adamw_8bit"}))

    def fits(update: dict) -> bool:
        shared = lora_shares if update.get("lora_r") else shares_weights
        return cell_memory(m, params.model_copy(update=update), device=device, shares_weights=shared).peak <= capacity

    def smaller_batch(update: dict) -> str | None:
        b, g = params.per_device_train_batch_size, params.gradient_accumulation_steps
        k = next((k for k in range(b - 1, 0, -1) if b * g % k == 0
                  and fits(update | {"per_device_train_batch_size": k})), None)
        return k and f"per_device_train_batch_size = {k} with gradient_accumulation_steps = {b * g // k}"

    one = [text for text, update in changes[:1] if fits(update)]
    one += [x for x in [smaller_batch({})] if x]
    one += [text for text, update in changes[1:] if fits(update)]
    if one:
        return one
    texts, update = [], {}
    for text, more in changes:
        texts, update = texts + [text], update | more
        if fits(update) or smaller_batch(update):
            return [" + ".join(texts + [x for x in [smaller_batch(update)] if x and not fits(update)])]
    return []


def gib(x: float) -> str:
    return f"{x / GIB:.2g}" if x < GIB else f"{x / GIB:.1f}" if x < 10 * GIB else f"{x / GIB:.0f}"


def summary(mem: Memory, n: int = 3) -> str:
    """'~41 GiB (optimizer states 30, fp32 master weights 15, gradients 15)'."""
    return f"~{gib(mem.peak)} GiB (" + ", ".join(f"{k} {gib(v)}" for k, v in mem.biggest(n)) + ")"

