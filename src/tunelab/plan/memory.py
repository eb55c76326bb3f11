"""Memory of a training run by method (full, LoRA, QLoRA), from the model's config alone.

No weights are loaded: the parameter counts come from ``config.json`` (hidden size,
intermediate size, layers, heads, key/value heads, vocabulary, tied embeddings), and the bytes
from what tunelab keeps for each kind of parameter (docs/practices.md#qlora-when):

* **weights**: the frozen base in its dtype (bf16 2 bytes, fp32 4); QLoRA's decoder linear
  weights in NF4 with double quantization, 0.516 bytes each (``train/memory.py``), embeddings,
  lm_head and norms unquantized; full fine-tuning keeps every weight in fp32 (4 bytes), as
  tunelab keeps all trainable parameters in fp32;
* **gradients**: 4 bytes per trainable parameter (fp32);
* **optimizer**: AdamW's two fp32 moments, 8 bytes per trainable parameter;
* **activations**: what backward needs, per token per layer, for the tokens of one
  forward/backward pass (``train.max_tokens_per_pass`` bounds them; an example longer than
  that is a pass of its own). transformers' forward: the layer input and the two norm inputs
  (3h), the attention's q, k, v and output (2h + 2 kv), the LoRA inputs and dropout masks of
  each adapted module, and the MLP's gate, up and product (3i); full fine-tuning adds every
  linear input. The fused CPU decoder (LoRA): 3h + 2 kv + 3i.
  Gradient checkpointing keeps one h per token per layer plus one layer's worth. Plus the
  logits of the trained positions (fp32 logits and their gradient);
* **overhead**: the runtime itself: on the CPU, the resident size of a Python process with
  torch, transformers, peft and tunelab imported plus a tiny run's working set (measured: ~0.5 GiB); on CUDA, the context (~0.5 GB).

On the CPU the peak can instead come at load time: a model stored in fp32 (the embedded model's
converted GGUF) is read through a memory map while its bf16 copy is built, so both count.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

GB = 1024**3
NF4_BYTES = 0.516  # 4 bits + 8/64 (absmax codes) + 32/(64*256) (their scales), bytes per weight
# RSS of a `tunelab train` process before its model: python + torch + transformers + peft +
# accelerate + tunelab's own imports (0.43 GiB right after the imports, 2026-12-02) plus the
# allocator's working set of a tiny run (measured peaks 0.59-0.70 GiB with a ~0.09 GiB model workload).
CPU_RUNTIME_BYTES = int(0.47 * GB)
CUDA_CONTEXT_BYTES = int(0.5 * GB)
LINEAR_CE_CHUNK = 512  # kernels/linear_ce.py: rows of logits held at once on the fused CPU path


class ModelConfigError(ValueError):
    """The model's config cannot be found or read; the message says how to give one."""


@dataclass
class ModelShape:
    """The sizes that decide memory, read from a transformers ``config.json``."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    dtype: str = "bfloat16"  # torch_dtype / dtype of the stored weights

    @classmethod
    def from_dict(cls, d: dict, name: str = "model") -> "ModelShape":
        d = dict(d.get("text_config") or d) if "hidden_size" not in d else d
        try:
            h, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
            return cls(
                name=name, model_type=str(d.get("model_type", "?")), hidden=h,
                intermediate=int(d.get("intermediate_size") or 4 * h), layers=int(d["num_hidden_layers"]), heads=heads,
                kv_heads=int(d.get("num_key_value_heads") or heads), head_dim=int(d.get("head_dim") or h // heads),
                vocab=int(d["vocab_size"]), tied=bool(d.get("tie_word_embeddings", False)),
                dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelConfigError(f"{name}: config.json lacks {e} (need hidden_size, num_attention_heads, num_hidden_layers, vocab_size)") from None

    # -- parameter counts -------------------------------------------------------------
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each decoder linear module, per layer (Llama-family names)."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def norm_params(self) -> int:
        return self.hidden * (2 * self.layers + 1)

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params

    def lora_params(self, rank: int, targets: Any) -> int:
        return self.layers * sum(rank * (a + b) for m, (a, b) in self.linear_shapes().items() if m in target_modules(targets))


def target_modules(targets: Any) -> set[str]:
    """The module names a ``lora.targets`` value adapts (models/adapters.py's presets)."""
    if isinstance(targets, (list, tuple)):
        return {str(t).rsplit(".", 1)[-1] for t in targets}
    return {"qv": {"q_proj", "v_proj"}, "attention": {"q_proj", "k_proj", "v_proj", "o_proj"},
            "all-linear": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}.get(str(targets), {"q_proj", "v_proj"})


def read_model_config(name: str) -> tuple[dict, str]:
    """(config dict, where it came from) for ``model.name``: a config.json path, a model dir,
    the embedded alias, or a hub id found in the local Hugging Face cache. Never downloads."""
    p = Path(os.path.expanduser(name))
    if p.suffix == ".json" and p.is_file():
        return json.loads(p.read_text()), str(p)
    if p.is_dir() and (p / "config.json").is_file():
        return json.loads((p / "config.json").read_text()), str(p / "config.json")
    from ..models.load import EMBEDDED_ALIASES, ModelError, resolve_model_path

    if name in EMBEDDED_ALIASES or p.suffix.lower() == ".gguf":
        try:
            d = Path(resolve_model_path(name))  # converted once and cached; later calls read the cache
        except ModelError as e:
            raise ModelConfigError(str(e)) from None
        return json.loads((d / "config.json").read_text()), str(d / "config.json")
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json")
    except Exception:
        hit = None
    if isinstance(hit, str) and Path(hit).is_file():
        return json.loads(Path(hit).read_text()), hit
    raise ModelConfigError(f"model {name!r}: no config.json found locally (not a dir, not in the Hugging Face cache); "
                           "give --model path/to/config.json or a model dir")


def load_shape(name: str) -> ModelShape:
    d, where = read_model_config(name)
    return ModelShape.from_dict(d, name)


@dataclass
class Workload:
    """What a run holds at once: the method and the shape of one optimizer step."""

    method: str = "lora"
    rank: int = 16
    targets: Any = "qv"
    batch_size: int = 8
    seq_len: int = 1024  # tokens per example (the data's p99 or max_seq_len)
    tokens_per_pass: Optional[int] = 2048  # train.max_tokens_per_pass; None: the whole micro-batch
    compute_bytes: int = 2  # bf16 2, fp32 4
    device: str = "cpu"
    gradient_checkpointing: bool = False
    trained_fraction: float = 0.5  # share of the tokens that carry loss (completion share)
    fused_decoder: bool = True  # CPU fast path (frozen base, Llama family): logits in chunks

    @classmethod
    def from_config(cls, cfg: Any, device: str, seq_len: Optional[int] = None, trained_fraction: float = 0.5,
                    compute_bytes: Optional[int] = None) -> "Workload":
        if compute_bytes is None:
            compute_bytes = 4 if cfg.model.dtype == "fp32" else 2
        return cls(cfg.method, cfg.lora.rank, cfg.lora.targets, cfg.train.batch_size, seq_len or cfg.data.max_seq_len,
                   cfg.train.max_tokens_per_pass, compute_bytes, device, cfg.train.gradient_checkpointing, trained_fraction,
                   cfg.train.fused_decoder)


@dataclass
class Estimate:
    method: str
    params: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    load_peak: int = 0  # CPU: a peak while loading (mmap of the stored weights + the converted copy)
    notes: list[str] = field(default_factory=list)

    @property
    def train_peak(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead

    @property
    def total(self) -> int:
        return max(self.train_peak, self.load_peak)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        d["train_peak"] = self.train_peak
        return d


def _dtype_bytes(name: str) -> int:
    return 4 if "32" in name else 2


def estimate(shape: ModelShape, w: Workload) -> Estimate:
    """The memory ``w`` needs on ``shape``, by part (bytes)."""
    h, i, kv, L = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim, shape.layers
    cb = w.compute_bytes
    mods = target_modules(w.targets)
    if w.method == "full":
        trainable = shape.params
        weights = 4 * shape.params
    else:
        trainable = shape.lora_params(w.rank, w.targets)
        rest = shape.embedding_params + shape.norm_params
        base = NF4_BYTES * shape.linear_params + cb * rest if w.method == "qlora" else cb * shape.params
        weights = int(base + 4 * trainable)
    gradients, optimizer = 4 * trainable, 8 * trainable

    # activations of one pass
    tokens = w.batch_size * w.seq_len
    if w.tokens_per_pass:
        tokens = max(min(tokens, w.tokens_per_pass), w.seq_len)
    shapes = shape.linear_shapes()
    fused = w.device == "cpu" and w.fused_decoder and w.method == "lora"
    if fused:
        # kernels/fused_llama.py keeps what its hand-written backward needs: the layer input, q and
        # the attention output (3h), k and v (2 kv), gate/up/product (3i); measured on the 135M:
        # ~12 KB per token per layer in bf16, this gives 13.4 KB
        per_layer = 3 * h + 2 * kv + 3 * i
    else:
        per_layer = 3 * h + 2 * h + 2 * kv + 3 * i  # norms + layer input, attention q/k/v/out, MLP gate/up/product
        if w.method == "full":
            per_layer += 2 * h + i  # o_proj and down_proj inputs (q/k/v and gate/up share the norm output)
        else:
            per_layer += sum(shapes[m][0] for m in mods) * 1.5  # each adapter's dropped-out input + its mask
    act_layer = cb * per_layer
    if w.gradient_checkpointing:
        activations = int(tokens * (L * cb * h + act_layer))
    else:
        activations = int(tokens * L * act_layer)
    trained = max(1, int(tokens * w.trained_fraction))
    if fused:
        logits = (4 + cb) * min(trained, LINEAR_CE_CHUNK) * shape.vocab  # kernels/linear_ce.py: an fp32 and a compute-dtype (chunk, V) buffer
    else:
        logits = 2 * 4 * trained * shape.vocab  # fp32 logits and their gradient, trained positions only
    overhead = CPU_RUNTIME_BYTES if w.device == "cpu" else CUDA_CONTEXT_BYTES
    load_peak = 0
    notes = []
    if w.device == "cpu":
        stored = _dtype_bytes(shape.dtype) * shape.params
        load_peak = overhead + stored + (weights if _dtype_bytes(shape.dtype) * shape.params != weights else 0)
    if w.method == "qlora" and w.device == "cpu":
        notes.append("QLoRA on the CPU saves memory but dequantizes every weight in every matmul: slower than LoRA")
    return Estimate(w.method, shape.params, trainable, int(weights), gradients, optimizer, activations, logits, overhead, int(load_peak), notes)


def estimate_all(shape: ModelShape, w: Workload) -> dict[str, Estimate]:
    from dataclasses import replace

    return {m: estimate(shape, replace(w, method=m)) for m in ("full", "lora", "qlora")}


def parse_size(text: str) -> int:
    """'24GB', '24 GiB', '512MB', '24' (GB) -> bytes (GB = 2**30, as nvidia-smi and free -g count)."""
    t = str(text).strip().upper().replace(" ", "").replace("IB", "B")
    units = {"TB": 1024**4, "GB": GB, "MB": 1024**2, "KB": 1024, "B": 1}
    for u, mult in units.items():
        if t.endswith(u):
            t = t[: -len(u)]
            break
    else:
        mult = GB
    try:
        v = float(t)
    except ValueError:
        raise ValueError(f"--memory {text!r}: expected a size such as 24GB or 512MB") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"--memory {text!r}: must be > 0")
    return int(v * mult)


def available_memory(device: str) -> int:
    """Memory a run could use here: the GPU's total, or the CPU's available RAM."""
    if device == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)
    import psutil

    return int(psutil.virtual_memory().available)


def gb(n: float) -> str:
    return f"{n / GB:.1f} GB"
