"""Peak memory of a GKD cell's training with the tiled loss against the full-vocabulary loss, side
by side in one run: a 2-layer Qwen3 with the real vocabulary (151,936), where the loss's
[batch, length, vocab] tensors are most of the memory. Each setting runs in its own process
(bench/gpu_step.py), which reports its peak (RSS on CPU, allocated on CUDA).

    .venv/bin/python bench/loss_memory.py                    # CPU, batch 16 × 64 tokens, a few minutes
    .venv/bin/python bench/loss_memory.py --device cuda --batch 32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def peak(kernel: str, lmbda: float, args, folder: Path) -> dict:
    out = folder / f"{kernel}-{lmbda}.json"
    cmd = [sys.executable, str(HERE / "gpu_step.py"), "--shape", "tiny-vocab", "--device", args.device,
           "--batch", str(args.batch), "--prompt", str(args.prompt), "--answer", str(args.answer), "--steps", "1",
           "--warmup", "1", "--lambdas", str(lmbda), "--loss-kernel", kernel, "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{kernel} λ={lmbda} failed:\n{done.stderr[-3000:]}")
    row = json.loads(out.read_text())[0]
    return {"gib": row.get("peak_memory_gib", row.get("peak_rss_gib")), "s_per_step": row["seconds_per_step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--answer", type=int, default=48)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.path.insert(0, str(HERE))
    from common import table

    rows, lines = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for lmbda in (0.0, 1.0):
            full, tiled = (peak(k, lmbda, args, Path(tmp)) for k in ("full", "chunked"))
            rows.append({"lambda": lmbda, "full": full, "chunked": tiled, "ratio": tiled["gib"] / full["gib"]})
            lines.append((f"{lmbda:g}", f"{full['gib']:.2f}", f"{tiled['gib']:.2f}", f"{tiled['gib'] / full['gib']:.2f}",
                          f"{full['s_per_step']:.2f}", f"{tiled['s_per_step']:.2f}"))
    print(f"GKD training peak, 2-layer Qwen3 (hidden 128) with vocabulary 151,936, batch {args.batch} × "
          f"({args.prompt} + {args.answer}) tokens, {args.device} ({'RSS' if args.device == 'cpu' else 'allocated'})\n")
    table(lines, ("lambda", "full GiB", "tiled GiB", "tiled / full", "full s/step", "tiled s/step"))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
