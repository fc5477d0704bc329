"""Teacher logits on the fixed training data, computed once per run and reused by every cell.

On an off-policy batch (data answers, no rollout) the teacher's logits depend only on the
teacher's weights and the batch's token ids, so every GKD cell of a run that trains on the
same batch can reuse them. Entries are keyed by the whole batch as the teacher sees it
(padded token ids, attention mask, the positions the loss reads), inside a folder keyed by
a fingerprint of the teacher (config, dtype, device, attention implementation, a sample of
every weight).

Exactness: an entry holds the teacher's raw logits at the batch's answer positions, in the
dtype the teacher produced them (fp32 on CPU, bf16 on a bf16 GPU run), computed from the
very tensor a fresh forward would get, so a served batch equals a recomputed one bit for
bit on deterministic kernels, whichever cell computed it first. (Keying single examples
would also reuse them across seeds, whose batches group the examples differently; but
logits computed in another batch shape differ in the last bits, and over a few hundred
steps that moved a toy cell's accuracy by 0.01: results would depend on the order cells
ran.) Cells that share batches are those with the same data, seed, batch size and length:
a learning-rate, λ<1, β or bits sweep; another seed fills its own entries.

Storage: ``<run>/shared/teacher/<fingerprint>/shard-*.safetensors`` (``CellContext.shared_dir``
is the run's ``shared/``), one shard per cell
that added entries, each written to a temporary name and renamed, so two processes (Ray
or local workers) filling the same cache never see a half-written file. Size: answer
tokens × vocabulary × 4 bytes (fp32); a 151k-token vocabulary costs 0.6 MB per answer
token, so ``teacher_cache_max_gb`` caps what one process keeps and writes.
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
    """Teacher logits at the answer positions of each training batch, for one teacher."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.entries: dict[str, torch.Tensor] = {}
        self.new: dict[str, torch.Tensor] = {}
        self.loaded_shards: set[str] = set()
        self.bytes = 0
        self.full = False

    @classmethod
    def for_run(cls, teacher, shared_dir: Path | None, max_gb: float) -> "TeacherCache | None":
        """The run's cache for ``teacher``, refreshed from disk; None outside a run (no shared folder)."""
        if shared_dir is None:
            return None
        folder = Path(shared_dir) / "teacher" / teacher_fingerprint(teacher)
        cache = _MEMORY.setdefault(str(folder), cls(folder, int(max_gb * 1e9)))
        cache.max_bytes = int(max_gb * 1e9)
        cache.refresh()
        return cache

    def refresh(self) -> None:
        """Read the shards other cells (or processes) wrote since we last looked."""
        from safetensors.torch import load_file

        if not self.folder.is_dir():
            return
        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            if shard.name in self.loaded_shards:
                continue
            for key, tensor in load_file(shard).items():
                self._keep(key, tensor)
            self.loaded_shards.add(shard.name)

    def _keep(self, key: str, tensor: torch.Tensor) -> bool:
        if key in self.entries:
            return False
        size = tensor.numel() * tensor.element_size()
        if self.bytes + size > self.max_bytes:
            self.full = True
            return False
        self.entries[key] = tensor
        self.bytes += size
        return True

    def key(self, inputs) -> str:
        return _batch_key(inputs)

    def lookup(self, inputs, key: str, vocab: int) -> torch.Tensor | None:
        """The batch's shifted teacher logits (B, T-1, V) if it is cached, else None.
        Positions the loss does not read stay zero; the loss masks them out."""
        rows = self.entries.get(key)
        if rows is None:
            return None
        ids = inputs["input_ids"]
        need = inputs["labels"][:, 1:] != -100
        out = torch.zeros(ids.shape[0], ids.shape[1] - 1, vocab, dtype=rows.dtype, device=ids.device)
        out[need] = rows.to(ids.device)
        return out

    def store(self, inputs, key: str, shifted_logits: torch.Tensor) -> None:
        if key in self.entries:
            return
        need = inputs["labels"][:, 1:] != -100
        rows = shifted_logits[need].detach().to("cpu", copy=True).contiguous()
        if self._keep(key, rows):
            self.new[key] = rows

    def save(self) -> None:
        """Write this process's new entries as one shard: temporary file, then rename."""
        from safetensors.torch import save_file

        if not self.new:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex}.safetensors"
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(self.new, tmp)
            os.replace(tmp, self.folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.loaded_shards.add(name)
        self.new = {}

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("shard-*.safetensors")) if self.folder.is_dir() else 0


def clear_memory() -> None:
    """Forget the in-process caches (tests use this to stand for a fresh process)."""
    _MEMORY.clear()
    _FINGERPRINTS.clear()
