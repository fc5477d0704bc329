"""Whether a fake quantizer stands for the weights it rounds: read inside their layer's forward, by a plain
product (``check_read_in_forward``, which every built-in quantizer calls in ``prepare``). One probe forward
finds a weight the model reads itself past its layer (Jamba's ``dt_proj``) and a Linear subclass computing
another product (DeepSeek-V4's grouped ``o_a_proj``)."""

from __future__ import annotations

from qcompare.errors import QcompareError
from qcompare.sdk.checks import dtype_tolerance, probe_ids
from qcompare.sdk.targets import Target, skip_patterns


def read_past_forward(model, targets: list[Target]) -> list[str]:
    """Why a fake quantizer would not stand for some of ``targets``, one line each (none: it stands for all,
    as far as one probe forward shows; a model the probe cannot run is warned about and passes).

    A fake quantizer rounds a weight inside its layer's forward, and convert puts codes in its place. Both
    compute the same only when the weight is read there and nowhere else, by a plain product. Two
    layouts break that: a Linear subclass whose own forward computes another product (DeepSeek-V4's
    grouped ``o_a_proj``: found by comparing its forward with ``F.linear`` on a probe input), and a model
    that reads a layer's weight itself, past its forward (Jamba's Mamba mixer multiplies by
    ``dt_proj.weight``: found by one forward pass on the probe tokens that watches every operation taking a
    target's tensor while no module holding it runs). Each line names the layer and the ``skip`` pattern
    that leaves it float. A model on the meta device has nothing to run: no lines."""
    import warnings

    import torch
    from torch import nn
    from torch.nn.modules import module as module_hooks
    from torch.overrides import TorchFunctionMode

    problems: dict[str, str] = {}

    def leave(t: Target, why: str) -> None:
        pattern = skip_patterns([t.name], model)  # one line per pattern: every layer's dt_proj is one fix
        problems.setdefault(pattern, f"{why} — add {pattern} to skip to leave it float")

    real = [t for t in targets if isinstance(t.weight, torch.Tensor) and t.weight.device.type != "meta"]
    for t in real:
        if t.kind == "linear" and type(t.module).forward is not nn.Linear.forward and not _computes_linear(t.module):
            leave(t, f"{type(t.module).__name__} ({t.name}) computes its own product with its weight, not a "
                     "Linear's, which a fake quantizer in its place would not compute")

    def storage(a):
        try:
            return a.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # a tensor subclass without one storage (torchao's, DTensor)
            return None

    owners = {storage(t.weight): (t, set()) for t in real}  # storage -> (target, the modules holding it)
    owners.pop(None, None)
    if not owners:
        return list(problems.values())
    for m in model.modules():
        for p in m._parameters.values():
            held = storage(p) if p is not None and p.device.type != "meta" else None
            if held in owners:
                owners[held][1].add(id(m))
    running: list = []  # the modules whose forward runs now, innermost last

    def enter(m, args):
        running.append(m)

    def leave_module(m, args, out):
        if running and running[-1] is m:
            running.pop()

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and running:  # a read of the values (not of .shape or .dtype)
                given = [*args, *(kwargs or {}).values()]
                for a in [x for g in given for x in (g if isinstance(g, (list, tuple)) else (g,))]:
                    found = owners.get(storage(a)) if isinstance(a, torch.Tensor) and a.device.type != "meta" else None
                    if found is not None and not any(id(m) in found[1] for m in running):
                        leave(found[0], f"{type(running[-1]).__name__} reads {found[0].qualified} itself, past "
                                        f"its layer's forward, where a fake quantizer does not see it")
            return out

    handles = [module_hooks.register_module_forward_pre_hook(enter),
               module_hooks.register_module_forward_hook(leave_module)]
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), Watch():
            model(probe_ids(model))
    except Exception as e:  # noqa: BLE001 - said, not hidden: the cell's own forward will show it
        warnings.warn(f"the probe forward that finds weights read past their layer failed ({type(e).__name__}: "
                      f"{(str(e).splitlines() or [''])[0]}); they are not checked", stacklevel=3)
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return list(problems.values())


def _computes_linear(module) -> bool:
    """Whether a Linear subclass's own forward computes ``F.linear`` with its weight (Falcon's ``x @ W.T + b``
    does), within its dtype's tolerance and never tighter than 1e-3 (the two round differently), in eval mode."""
    import torch
    import torch.nn.functional as F

    w = module.weight
    training = module.training
    module.eval()
    try:
        x = torch.randn(2, 3, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w)
        with torch.no_grad():
            got, want = module(x), F.linear(x, w, module.bias)
        scale = float(want.abs().max()) or 1.0
        # at least 1e-3: x @ W.T and F.linear run different kernels (a wrong product is off by O(1))
        return isinstance(got, torch.Tensor) and got.shape == want.shape and \
            float((got - want).abs().max()) <= max(dtype_tolerance(w.dtype), 1e-3) * scale
    except Exception:  # noqa: BLE001 - it takes no input of its in_features: another product
        return False
    finally:
        module.train(training)


def check_read_in_forward(model, targets: list[Target], quantizer: str) -> None:
    """Raise QcompareError (one line, prefixed ``quantizer:``) when a fake quantizer would not stand for one
    of ``targets`` (``read_past_forward``); a model on the meta device passes (nothing to run)."""
    problems = read_past_forward(model, targets)
    if problems:
        more = f" (and {len(problems) - 1} more such layers)" if len(problems) > 1 else ""
        raise QcompareError(f"{quantizer}: {problems[0]}{more}")
