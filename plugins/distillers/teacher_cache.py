"""The teacher's work on the fixed training data, computed once per run and reused by every cell.

On an off-policy batch (data answers, no rollout) the teacher's output depends only on the
teacher's weights and the batch's token ids, so every GKD cell of a run that trains on the
same batch can reuse it. Entries are keyed by the whole batch as the teacher sees it
(padded token ids, attention mask, the positions the loss reads), inside a folder keyed by
a fingerprint of the teacher (config, dtype, device, attention implementation, a sample of
every weight) and by what is stored.

What is stored (``mode``):
- ``hidden``: the input of the teacher's output head, (batch, length, hidden) — ~vocabulary /
  hidden times smaller than logits (59× for Qwen3-4B). A served batch recomputes the logits
  with the teacher's own head on that very tensor, then whatever the model applies after it
  (``final_logit_softcapping``, ``logit_scale``, ``logits_scaling``): the same operation on the
  same input as a fresh forward, so the same logits bit for bit on deterministic kernels. Each
  cell checks that on its first computed batch and falls back to a fresh forward if not.
- ``logits``: the raw logits at the answer positions, as the teacher produced them (fp32 on CPU,
  bf16 on a bf16 GPU run). Exact too, but answer tokens × vocabulary × 4 bytes.

(Keying single examples would also reuse them across seeds, whose batches group the examples
differently; but outputs computed in another batch shape differ in the last bits, and over a few
hundred steps that moved a toy cell's accuracy by 0.01: results would depend on the order cells
ran.) Cells that share batches are those with the same data, seed, batch size and length: a
learning-rate, λ<1, β or bits sweep; another seed fills its own entries.

Where it lives: in memory up to ``max_bytes``; beyond that, entries are written at once to
``<run>/shared/teacher/<fingerprint>/<mode>/shard-*.safetensors`` and read back memory-mapped
when served, up to ``max_disk_bytes``. Shards are written under a temporary name and renamed,
so the workers of one run (local or Ray) share them and never see a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
import weakref
from pathlib import Path

import torch

from qcompare.sdk import on_clear

# In-process caches by folder, so cells run one after another in one process (the local
# executor) reuse entries without reading the disk again.
_MEMORY: dict[str, "TeacherCache"] = {}
_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def teacher_fingerprint(teacher) -> str:
    """A short hash of what the teacher's logits depend on. Hashes a strided sample of every
    weight (not all of it) so a 4B model is fingerprinted in well under a second."""
    if teacher in _FINGERPRINTS:
        return _FINGERPRINTS[teacher]
    h = hashlib.blake2b(digest_size=12)
    config = teacher.config.to_dict() if hasattr(teacher.config, "to_dict") else dict(teacher.config)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(str(getattr(teacher.config, "_attn_implementation", "")).encode())
    for name, p in teacher.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096]
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{p.device.type}".encode())
        h.update(sample.float().cpu().numpy().tobytes())
    _FINGERPRINTS[teacher] = h.hexdigest()
    return _FINGERPRINTS[teacher]


def _batch_key(inputs) -> str:
    """Key of one batch: what the teacher's forward sees (ids, mask, shape) and what the loss reads."""
    h = hashlib.blake2b(digest_size=16)
    for name in ("input_ids", "attention_mask"):
        t = inputs[name]
        h.update(f"{name}:{tuple(t.shape)}|".encode())
        h.update(t.to(torch.int64).cpu().numpy().tobytes())
    h.update((inputs["labels"][:, 1:] != -100).cpu().numpy().tobytes())
    return h.hexdigest()


class TeacherCache:
    """The teacher's output (``mode``: head inputs or answer-position logits) per training batch,
    for one teacher: in memory up to ``max_bytes``, then memory-mapped shards on disk."""

    def __init__(self, folder: Path, max_bytes: int, max_disk_bytes: int = 0, mode: str = "logits"):
        self.folder, self.mode = Path(folder), mode
        self.max_bytes, self.max_disk_bytes = max_bytes, max_disk_bytes
        self.entries: dict[str, torch.Tensor] = {}  # in memory
        self.on_disk: dict[str, str] = {}  # key -> shard file name (read memory-mapped when served)
        self.new: dict[str, torch.Tensor] = {}  # computed here, not yet in a shard
        self.loaded_shards: set[str] = set()
        self._open: dict[str, object] = {}
        self.bytes = 0
        self.full = False

    @classmethod
    def for_run(cls, teacher, shared_dir: Path | None, max_gb: float, max_disk_gb: float,
                mode: str = "logits") -> "TeacherCache | None":
        """The run's cache for ``teacher``, refreshed from disk; None outside a run (no shared folder)."""
        if shared_dir is None:
            return None
        folder = Path(shared_dir) / "teacher" / teacher_fingerprint(teacher) / mode
        cache = _MEMORY.setdefault(str(folder), cls(folder, int(max_gb * 1e9), int(max_disk_gb * 1e9), mode))
        cache.max_bytes, cache.max_disk_bytes = int(max_gb * 1e9), int(max_disk_gb * 1e9)
        cache.refresh()
        return cache

    def refresh(self) -> None:
        """Note the shards other cells (or processes) wrote since we last looked; their entries are
        read when served (memory-mapped), not now."""
        from safetensors import safe_open

        if not self.folder.is_dir():
            return
        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            if shard.name in self.loaded_shards:
                continue
            with safe_open(shard, framework="pt") as f:
                for key in f.keys():
                    if key not in self.entries:
                        self.on_disk.setdefault(key, shard.name)
            self.loaded_shards.add(shard.name)

    def __contains__(self, key: str) -> bool:
        return key in self.entries or key in self.on_disk

    def key(self, inputs) -> str:
        return _batch_key(inputs)

    def get(self, key: str) -> torch.Tensor | None:
        """What was stored for the batch, from memory or its shard."""
        if key in self.entries:
            return self.entries[key]
        name = self.on_disk.get(key)
        if name is None:
            return None
        from safetensors import safe_open

        if name not in self._open:
            self._open[name] = safe_open(self.folder / name, framework="pt")  # memory-mapped
        return self._open[name].get_tensor(key)

    def lookup(self, inputs, key: str, vocab: int) -> torch.Tensor | None:
        """(logits mode) The batch's shifted teacher logits (B, T-1, V) if cached, else None.
        Positions the loss does not read stay zero; the loss masks them out."""
        rows = self.get(key)
        return None if rows is None else self.expand(inputs, rows, vocab)

    @staticmethod
    def expand(inputs, rows: torch.Tensor, vocab: int) -> torch.Tensor:
        """(logits mode) Stored answer rows back in place: (B, T-1, V), zero where the loss does
        not read."""
        ids = inputs["input_ids"]
        need = inputs["labels"][:, 1:] != -100
        out = torch.zeros(ids.shape[0], ids.shape[1] - 1, vocab, dtype=rows.dtype, device=ids.device)
        out[need] = rows.to(ids.device)
        return out

    def store(self, inputs, key: str, value: torch.Tensor) -> None:
        """Keep ``value`` for the batch: in logits mode the shifted logits (only the answer rows are
        kept), in hidden mode the head's whole input."""
        if key in self:
            return
        if self.mode == "logits":
            value = value[inputs["labels"][:, 1:] != -100]
        value = value.detach().to("cpu", copy=True).contiguous()
        size = value.numel() * value.element_size()
        if self.bytes + size <= self.max_bytes:
            self.entries[key] = value
            self.bytes += size
            self.new[key] = value
            return
        # memory is full: straight to disk, while the disk budget lasts
        if self.disk_bytes() + size > self.max_disk_bytes:
            self.full = True
            return
        self._write({key: value})

    def save(self) -> None:
        """Write this process's new in-memory entries as one shard."""
        fresh, self.new = self.new, {}
        if fresh and self.disk_bytes() + sum(v.numel() * v.element_size() for v in fresh.values()) \
                <= self.max_disk_bytes:
            self._write(fresh)

    def _write(self, tensors: dict) -> None:
        """One shard: a temporary file, then a rename (what memory holds stays there)."""
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex}.safetensors"
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(tensors, tmp)
            os.replace(tmp, self.folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.loaded_shards.add(name)
        for key in tensors:
            self.on_disk[key] = name
            self.new.pop(key, None)

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("shard-*.safetensors")) if self.folder.is_dir() else 0


@on_clear
def clear_memory() -> None:
    """Forget the in-process caches (tests use this to stand for a fresh process)."""
    _MEMORY.clear()
    _FINGERPRINTS.clear()
