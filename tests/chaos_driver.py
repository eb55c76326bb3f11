"""Run ``tunelab train`` and SIGKILL this very process at a chosen point (tests/test_chaos.py).

``CHAOS_KILL=phase:n`` picks the point; the kill is a real ``SIGKILL`` of the process, so nothing
(no finally, no atexit) runs after it:

- ``step:n``     right after the n-th optimizer update, before that step's checkpoint
- ``forward:n``  in the middle of the n-th forward pass
- ``ckpt:n``     inside the n-th checkpoint write, after optimizer.pt (the folder is half written)
- ``rotate:n``   while removing an old checkpoint, the n-th time
- ``metrics:n``  half way through writing the n-th metrics.jsonl line
- ``adapter:1``  while writing the final adapter, before its rename
- ``none``       no kill (the parent may kill at a random time instead)

``--server`` makes it a fork server: the imports (torch, transformers, peft: seconds per process)
are paid once; each run is a fresh child forked from it, stdout and stderr to a file, killed
for real. Protocol (one JSON line each way): ``{"argv", "kill", "log"}`` in; ``{"pid"}`` when
the child starts and ``{"pid", "status"}`` when it ends (status as from ``os.waitpid``).
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch

count = {"n": 0, "target": 0}


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def hit() -> bool:
    count["n"] += 1
    return count["n"] == count["target"]


def install(spec: str) -> None:
    phase, _, n = spec.partition(":")
    count["target"] = int(n or 0)
    if phase == "step":
        real_step = torch.optim.AdamW.step

        def step(self, *a, **k):
            out = real_step(self, *a, **k)
            if hit():
                die()
            return out

        torch.optim.AdamW.step = step
    elif phase == "forward":
        from tunelab.train import loss as loss_mod

        real_forward = loss_mod.CausalLMLoss.forward

        def forward(self, *a, **k):
            if hit():
                die()
            return real_forward(self, *a, **k)

        loss_mod.CausalLMLoss.forward = forward
    elif phase == "ckpt":
        from tunelab.train import checkpoint as ck

        real_save = ck.torch.save

        def save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            if str(f).endswith("optimizer.pt") and hit():
                die()

        ck.torch.save = save
    elif phase == "rotate":
        from tunelab.train import checkpoint as ck

        real_rmtree = ck.shutil.rmtree

        def rmtree(path, *a, **k):
            if sys._getframe(1).f_code.co_name == "save_checkpoint" and hit():
                os.remove(os.path.join(path, "trainable.safetensors"))  # half removed
                die()
            return real_rmtree(path, *a, **k)

        ck.shutil.rmtree = rmtree
    elif phase == "metrics":
        from tunelab.train import reporting

        real_metrics = reporting.Reporter.metrics

        def metrics(self, **values):
            if values.get("event") == "train" and hit():
                with open(self.metrics_path, "a") as fh:
                    fh.write('{"event": "train", "step": ')
                die()
            return real_metrics(self, **values)

        reporting.Reporter.metrics = metrics
    elif phase == "adapter":
        from tunelab import files

        real_replace = files.os.replace

        def replace(src, dst, *a, **k):
            if os.path.basename(str(dst)) == "adapter" and hit():
                die()
            return real_replace(src, dst, *a, **k)

        files.os.replace = replace



def serve() -> None:
    import tunelab.cli  # noqa: F401  (the imports every child would pay)
    import tunelab.train.recipe  # noqa: F401
    import peft  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401

    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            rc = 1
            try:
                torch.set_num_threads(1)
                install(job["kill"])
                from tunelab.cli import main

                rc = main(job["argv"])
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "status": status}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--server"]:
        serve()
    else:
        torch.set_num_threads(1)
        install(os.environ.get("CHAOS_KILL", "none"))
        from tunelab.cli import main

        sys.exit(main(sys.argv[1:]))
