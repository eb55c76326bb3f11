"""What the recipe needs from accelerate beyond ``prepare``: the accelerator for a run, work done
once for all processes, equal pass counts under FSDP, and full-state checkpoints.

Everything distributed is accelerate over torch.distributed (DDP or FSDP, chosen by
``accelerate launch`` and its config); nothing here is a communication layer of its own.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")


def make_accelerator() -> Any:
    """One process: the CPU or the CUDA device. Under ``accelerate launch`` / torchrun: DDP or FSDP.

    DDP is told not to broadcast buffers at each forward: the only buffers are constants (RoPE
    frequencies), and a broadcast per forward would be a collective that every process must reach
    the same number of times, while the number of passes per step differs between processes
    (passes are cut by tokens, ``train.max_tokens_per_pass``)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


def is_fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def run_once(accelerator: Any, fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on the main process only (the audit, the doctor); if it raises there, raise the
    same error on every process, so that no process waits forever for one that gave up."""
    from accelerate.utils import broadcast_object_list

    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every process
            error = e
    if accelerator.num_processes > 1:
        box = [error]
        broadcast_object_list(box, from_process=0)
        error = box[0]
    if error is not None:
        raise error
    return result


def equalize_passes(accelerator: Any, batches: list[Any]) -> list[tuple[Any, float]]:
    """(batch, weight) per pass. Under FSDP every process must run the same number of forward and
    backward passes (each one all-gathers and reduce-scatters), so a process with fewer passes
    repeats its last one with weight 0: it joins the collectives and adds nothing to the loss or
    the gradients. Elsewhere every pass has weight 1."""
    out = [(b, 1.0) for b in batches]
    if not is_fsdp(accelerator) or accelerator.num_processes == 1:
        return out
    n = torch.tensor(len(batches), device=accelerator.device)
    most = int(accelerator.reduce(n, reduction="max"))
    return out + [(batches[-1], 0.0)] * (most - len(batches))


def full_trainable_state(accelerator: Any, loss_fn: Any) -> dict[str, torch.Tensor] | None:
    """The trainable weights of the whole model on the main process (None elsewhere), under the
    plain model's names. Under FSDP gathering is a collective: every process must call this."""
    if is_fsdp(accelerator):
        sd = accelerator.get_state_dict(loss_fn)  # full state dict on the main process
        if not accelerator.is_main_process:
            return None
        names = {n for n, p in accelerator.unwrap_model(loss_fn).named_parameters() if p.requires_grad}
        return {k[len("model."):]: v.detach().cpu().contiguous() for k, v in sd.items() if k in names}
    if not accelerator.is_main_process:
        return None
    model = accelerator.unwrap_model(loss_fn).model
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def full_optimizer_state(accelerator: Any, loss_fn: Any, optimizer: Any) -> dict | None:
    """Optimizer state for the whole model on the main process (None elsewhere). DDP: every
    process holds all of it, in parameter order. FSDP: gathered with torch's full state dict."""
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        sd = get_optimizer_state_dict(accelerator.unwrap_model(loss_fn), optimizer,
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if accelerator.is_main_process else None
    return optimizer.state_dict() if accelerator.is_main_process else None


def load_optimizer_state(accelerator: Any, loss_fn: Any, optimizer: Any, state: dict) -> None:
    if is_fsdp(accelerator):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(accelerator.unwrap_model(loss_fn), optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
