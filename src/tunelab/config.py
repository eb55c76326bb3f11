"""Typed configuration: one dataclass per concern, loaded from YAML with ``--set`` overrides.

Every field is documented in its ``metadata["doc"]``; ``tunelab config-doc`` (and the README)
print them. Unknown keys are errors with a did-you-mean, values are validated, and the
user's config is never mutated: ``resolve()`` returns a new object plus the list of what
was overridden (after litgpt's ``args.py``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .config_errors import ConfigError, format_errors, locator, suggest_key, yaml_key_lines

__all__ = ["ConfigError"]  # re-exported: callers import it from here


def _f(default: Any = dataclasses.MISSING, doc: str = "", factory: Any = dataclasses.MISSING):
    kw: dict[str, Any] = {"metadata": {"doc": doc}}
    if factory is not dataclasses.MISSING:
        kw["default_factory"] = factory
    else:
        kw["default"] = default
    return field(**kw)


TrainOn = Literal["assistant", "last_assistant", "all"]  # which tokens carry loss; see DataConfig.train_on


@dataclass
class ModelConfig:
    name: str = _f("smollm2-135m-instruct", "Model: 'smollm2-135m-instruct' (embedded), a Hugging Face id, a local dir, or a .gguf file.")
    dtype: Literal["auto", "bf16", "fp32"] = _f("auto", "Dtype of the frozen base. auto = bf16 where the hardware runs it fast, else fp32. Trainable parameters are always fp32.")
    trust_remote_code: bool = _f(False, "Run model code from the hub. Off unless you trust the source.")
    allow_pickle: bool = _f(False, "Load weights or checkpoint state that only pickle can read (.bin/.pt, arbitrary code). Off: safetensors and torch.load(weights_only=True) only; --allow-pickle sets it.")
    attn_implementation: str = _f("sdpa", "Attention kernel passed to transformers (sdpa, eager, flash_attention_2).")


@dataclass
class DatasetEntry:
    path: str = _f(None, "A local file (.jsonl, .json, .csv, .parquet) or a folder written by datasets' save_to_disk; a relative path is taken from the config file's folder. Give path or hub.")
    hub: Optional[str] = _f(None, "A Hugging Face dataset id read from the local HF cache (HF_HOME), never downloaded: e.g. tatsu-lab/alpaca. Give path or hub.")
    split: Optional[str] = _f(None, "Split of a save_to_disk folder or hub dataset (default: the only split, else train).")
    columns: Optional[dict[str, str]] = _f(None, "Column mapping {format key: your column}, applied before format detection: {prompt: question, completion: answer}, {messages: dialog}, {instruction: q, input: ctx, output: a}.")
    format: Literal["auto", "alpaca", "dolly", "flan", "sharegpt", "messages", "text"] = _f("auto", "Record format; auto detects it from the keys.")
    weight: float = _f(1.0, "Mixing weight: datasets contribute examples in proportion to their weights.")
    name: Optional[str] = _f(None, "Task tag used when records carry none (default: the file's stem or the hub dataset's name).")

    @property
    def source(self) -> str:
        """How errors and reports name this dataset: the path, or hub:<id>."""
        return self.path if self.path else f"hub:{self.hub}"


@dataclass
class ReplayConfig:
    path: str = _f(None, "File of general text (format text: {text}) or instruction records; every token of a replay record is trained (LM loss).")
    fraction: float = _f(0.05, "Share of the trained tokens that come from replay, in [0, 0.5].")
    format: Literal["auto", "alpaca", "dolly", "flan", "sharegpt", "messages", "text"] = _f("auto", "Record format; auto detects it from the keys.")


@dataclass
class DataConfig:
    train: list[DatasetEntry] = _f(factory=list, doc="Training datasets: a list of {path or hub, split, columns, format, weight, name} (each field as under data.eval).")
    eval: Optional[DatasetEntry] = _f(None, "Eval dataset {path, format}. Takes precedence over eval_fraction.")
    eval_fraction: Optional[float] = _f(None, "Fraction of the training data split off for eval, seeded and stratified by task. Default (null): 5%, at least 16 and at most 500 records, none when the data has fewer than 40 records. 0 turns the split off (and with it early stopping).")
    replay: Optional[ReplayConfig] = _f(None, "Replay buffer {path, fraction}: general or pretraining text mixed into training to reduce forgetting (docs/practices.md#reg-replay).")
    on_error: Literal["raise", "skip"] = _f("raise", "Bad records: raise an error naming file:line, or skip them and report the count.")
    train_on: TrainOn = _f("assistant", "Which tokens carry loss: every assistant turn (+ its end-of-turn token), only the last one, or all tokens.")
    max_seq_len: int = _f(1024, "Maximum tokens per example.")
    truncation: Literal["drop", "truncate_prompt"] = _f("drop", "Over-long examples: drop them, or cut the prompt from the left. Examples that would lose every completion token are never trained.")
    audit: Literal["off", "warn", "strict"] = _f("warn", "Data audit before training: off, warn (print a summary), strict (refuse to train on error findings).")


@dataclass
class LoraConfig:
    rank: int = _f(16, "LoRA rank r: 4-64 typical; above 128 defeats the purpose (docs/practices.md#lora-rank).")
    alpha: Optional[float] = _f(None, "LoRA alpha; default 2 x rank.")
    dropout: float = _f(0.05, "Dropout on the LoRA input: 0.05-0.1 regularises (docs/practices.md#reg-dropout).")
    targets: Union[str, list[str]] = _f("qv", "Modules: qv (q_proj+v_proj, the usual start: docs/practices.md#lora-targets), attention, all-linear, or a list of module names.")
    layers: Union[str, list[int]] = _f("all", "Layers that get adapters: all, top:N (the N closest to the output), or a list of indices.")


@dataclass
class EarlyStoppingConfig:
    enabled: Optional[bool] = _f(None, "Early stopping on eval loss; default: on when an eval set exists.")
    patience: int = _f(3, "Evals without improvement before stopping.")
    min_delta: float = _f(0.0, "Improvement in eval loss smaller than this does not count.")


@dataclass
class TrainConfig:
    lr: Optional[float] = _f(None, "Peak learning rate; default 2e-4 for LoRA/QLoRA, 1e-5 for full fine-tuning.")
    epochs: float = _f(2, "Passes over the training data (ignored when max_steps is set).")
    max_steps: Optional[int] = _f(None, "Optimizer steps; overrides epochs.")
    batch_size: int = _f(8, "Examples per micro-batch (per process).")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    warmup: float = _f(0.05, "Warmup as a fraction of total steps: 3-10% (docs/practices.md#hp-warmup).")
    schedule: Literal["cosine", "linear", "constant_with_warmup"] = _f("cosine", "LR schedule after warmup.")
    min_lr_ratio: float = _f(0.0, "Final LR as a fraction of the peak.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: Optional[float] = _f(1.0, "Gradient clipping norm; null disables it.")
    seed: int = _f(42, "Seed for data order, splits and initialisation.")
    eval_every: Optional[int] = _f(None, "Steps between evals; default: about 10 evals per run.")
    save_every: Optional[int] = _f(None, "Steps between resumable checkpoints; default: at each eval.")
    keep_checkpoints: int = _f(2, "Resumable checkpoints kept on disk.")
    log_every: int = _f(1, "Steps between metrics lines.")
    early_stopping: EarlyStoppingConfig = _f(factory=EarlyStoppingConfig, doc="Early stopping on eval loss.")
    length_grouping: bool = _f(True, "Batch examples of similar length (shuffled buckets, seeded) to cut padding.")
    trained_logits_only: bool = _f(True, "Compute lm_head and cross-entropy only at positions whose labels are trained.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    eval_batch_size: Optional[int] = _f(None, "Eval micro-batch size; default: batch_size.")
    fused_decoder: bool = _f(True, "Fast path for Llama-family models (llama, mistral, qwen2) with a frozen base (LoRA): decoder layers with a hand-written backward, examples packed without padding (attention stays within each example), q/k/v as one matmul. Same loss and gradients as the transformers forward up to fp32 rounding; other models fall back to it. Needs trained_logits_only.")
    shared_prefix: bool = _f(True, "Fused decoder: a prompt prefix that all examples of a pass start with (e.g. the chat template's default system prompt) is computed once and attended to by each example. Exact (causal attention); only the LoRA dropout masks on those tokens are shared within the pass.")
    compile_pointwise: bool = _f(False, "Fused decoder: compile its RMSNorm and SwiGLU steps (forward and backward) with torch.compile (inductor, CPU; needs a C++ compiler, else they run eagerly with a warning). Measured on a 2-core AMX Xeon (bf16): forward + backward 1.01-1.02x faster on a quiet machine (1.08-1.26x in a noisy hour; benchmarks/pointwise_compile.py), at ~5 s of compiling per run with a warm inductor cache and ~40 s the first time on a machine: a small gain, for long runs only (docs/performance.md).")
    padding_free: bool = _f(True, "transformers-forward path (GPUs, and the CPU when the fused decoder is off or unsupported): the examples of a pass are packed into one row without padding, position_ids restarting at each example, and transformers' masking utilities keep attention within each example (sdpa/eager: block-causal mask; flash_attention_2: varlen). A probe checks the model honours this; false: padded batches with an attention mask.")
    on_nonfinite: Literal["stop", "skip_batch"] = _f("stop", "A non-finite loss or gradient: stop the run (the last good checkpoint is kept; the message names the step and the batch's records), or skip the batch without an update.")
    max_skipped_batches: int = _f(10, "on_nonfinite: skip_batch stops the run once more batches than this were skipped.")
    kernels: Literal["none", "liger"] = _f("none", "Fused GPU kernels: liger = Liger-Kernel's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy (CUDA only; pip install 'tunelab[liger]').")
    max_tokens_per_pass: Optional[int] = _f(2048, "Split each micro-batch into forward/backward passes of at most this many real tokens (an example longer than that is a pass of its own). Fused decoder activations are ~24 KB per token per layer (fp32), so 2048 tokens of a 30-layer model hold ~1.5 GB; 2048 was as fast as or faster than 1024 in 3 of 4 paired runs on a 2-core CPU (docs/performance.md). Gradients add up to the same step; activation memory stays bounded whatever batch_size and length. null: one pass per micro-batch.")


@dataclass
class DoctorConfig:
    enabled: bool = _f(True, "Run the doctor (config lint against docs/practices.md, memory estimate) before training and print its findings.")
    strict: bool = _f(False, "Refuse to train when the doctor finds an error (as tunelab train --strict).")


@dataclass
class ReportConfig:
    enabled: bool = _f(True, "Write runs/<name>/report.html (curves, doctor, audit, config, samples) at the end of tunelab train.")
    samples: int = _f(3, "Eval prompts generated before (base) and after (trained) training for the report; 0: none.")
    sample_tokens: int = _f(48, "Max new tokens per sample generation (greedy).")


@dataclass
class EvalConfig:
    retention: Optional[str] = _f(None, "File (raw text or instruction data) measured on the base and the tuned model at the end of a run, written to runs/NAME/retention.json (docs/practices.md#overfit-forgetting).")
    retention_max: int = _f(200, "Records of eval.retention used at most.")
    generate_every: Optional[int] = _f(None, "Every N steps, generate greedily on eval.generate_sample train and held-out prompts and log exact match on both (the train vs held-out gap curve, shown by tunelab diagnose); off by default (docs/practices.md#overfit-metrics).")
    generate_sample: int = _f(16, "Train and held-out prompts each that eval.generate_every generates on (a fixed, seeded sample).")
    generate_max_tokens: int = _f(32, "New tokens per answer in the eval.generate_every probe (exact match is for short answers).")


@dataclass
class Config:
    name: str = _f("run", "Run name; output goes to runs/<name> unless output_dir is set.")
    output_dir: Optional[str] = _f(None, "Run directory (default runs/<name>).")
    method: Literal["lora", "qlora", "full"] = _f("lora", "lora (default), qlora (LoRA on an NF4 base) or full fine-tuning.")
    template: str = _f("auto", "Prompt template: auto (the tokenizer's chat template), chatml, llama3, llama2, mistral, alpaca, plain, a .jinja file, or an inline Jinja chat template. Custom templates pass the same parity check as the built-ins.")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = _f(factory=list, doc="Experiment trackers (accelerate's): tensorboard (logs in <run>/tracking), wandb, mlflow (MLFLOW_TRACKING_URI, default <run>/mlruns). Metrics, the config as hyperparameters and the final tables, from rank 0. Each needs its extra: pip install 'tunelab[tensorboard]'.")
    model: ModelConfig = _f(factory=ModelConfig, doc="The model.")
    data: DataConfig = _f(factory=DataConfig, doc="Datasets, masking and lengths.")
    lora: LoraConfig = _f(factory=LoraConfig, doc="LoRA adapters.")
    train: TrainConfig = _f(factory=TrainConfig, doc="The training loop.")
    doctor: DoctorConfig = _f(factory=DoctorConfig, doc="The pre-training check (tunelab doctor).")
    report: ReportConfig = _f(factory=ReportConfig, doc="The HTML report written at the end of a run.")
    eval: EvalConfig = _f(factory=EvalConfig, doc="Evaluation beyond the eval loss: forgetting at the end of a run.")

    # -- derived values: computed, never written back into the user's fields --
    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name

    @property
    def lr(self) -> float:
        if self.train.lr is not None:
            return self.train.lr
        return 1e-5 if self.method == "full" else 2e-4

    @property
    def lora_alpha(self) -> float:
        return self.lora.alpha if self.lora.alpha is not None else 2.0 * self.lora.rank

    @property
    def has_eval(self) -> bool:
        return self.data.eval is not None or self.data.eval_fraction is None or self.data.eval_fraction > 0

    @property
    def early_stopping_on(self) -> bool:
        es = self.train.early_stopping.enabled
        return self.has_eval if es is None else (es and self.has_eval)


# --------------------------------------------------------------------------- loading

def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], optional
        return Union[tuple(args)], optional
    return tp, False


def _err(where: str, msg: str) -> ConfigError:
    return ConfigError(f"{where}: {msg}", [(where, f"{where}: {msg}")])


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check and convert ``value`` to type ``tp``; raise ConfigError naming ``where``."""
    tp, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise _err(where, f"null is not allowed here")
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and tp in (DatasetEntry, ReplayConfig):
            value = {"path": value}
        if not isinstance(value, dict):
            raise _err(where, f"expected a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}, got {value!r}")
        return _build(tp, value, where)
    if origin is dict:
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise _err(where, f"expected a mapping, got {value!r}")
        return {_coerce(k, key_tp, where): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and ("off" in choices or "on" in choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare `off` as false
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            raise _err(where, f"{value!r} is not one of {list(choices)}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
        return value
    if origin in (Union, types.UnionType):
        errors = []
        for alt in typing.get_args(tp):
            try:
                return _coerce(value, alt, where)
            except ConfigError as e:
                errors.append(str(e))
        raise _err(where, f"{value!r} fits none of the allowed forms ({'; '.join(errors)})")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _err(where, f"expected a list, got {value!r}")
        items, errors = [], []
        for i, v in enumerate(value):
            try:
                items.append(_coerce(v, item_tp, f"{where}[{i}]"))
            except ConfigError as e:
                errors.extend(e.errors)
        if errors:
            raise ConfigError("\n".join(m for _, m in errors), errors)
        return items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise _err(where, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise _err(where, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise _err(where, f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise _err(where, f"expected a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise _err(where, f"expected a finite number, got {value!r}")
            return float(value)
        raise _err(where, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise _err(where, f"expected a string, got {value!r}")
        return str(value)
    return value


def _leaves(cls: type = None, prefix: str = "") -> dict[str, list[str]]:
    """Every key name of the config tree -> its dotted paths (for did-you-mean across sections)."""
    cls = cls or Config
    out: dict[str, list[str]] = {}
    for f in dataclasses.fields(cls):
        inner, _ = _strip_optional(typing.get_type_hints(cls)[f.name])
        out.setdefault(f.name, []).append(prefix + f.name)
        if dataclasses.is_dataclass(inner):
            for k, v in _leaves(inner, prefix + f.name + ".").items():
                out.setdefault(k, []).extend(v)
    return out


def _build(cls: type, data: dict, where: str) -> Any:
    """Build ``cls`` from ``data``; raise one ConfigError listing every problem found."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    errors: list[tuple[str, str]] = []
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            hint = suggest_key(str(key), where, fields, _leaves())
            errors.append((path, f"unknown config key {path!r}; "
                           + (hint if hint else f"valid keys here: {', '.join(fields)}")))
            continue
        try:
            kwargs[key] = _coerce(value, hints[key], path)
        except ConfigError as e:
            errors.extend(e.errors)
    obj = cls(**kwargs)
    errors.extend(_validate(obj, where))
    if errors:
        raise ConfigError("\n".join(m for _, m in errors), errors)
    return obj


def _validate(obj: Any, where: str) -> list[tuple[str, str]]:
    """Every out-of-range value of ``obj`` as (key path, message)."""
    errors: list[tuple[str, str]] = []

    def bad(key: str, msg: str) -> None:
        path = f"{where + '.' if where else ''}{key}"
        errors.append((path, f"{path}: {msg}"))

    if isinstance(obj, DatasetEntry):
        if bool(obj.path) == bool(obj.hub):
            bad("path", "every dataset needs a path (file or save_to_disk folder) or a hub id, not both")
        if obj.weight <= 0:
            bad("weight", f"must be > 0, got {obj.weight}")
    elif isinstance(obj, DataConfig):
        if obj.eval_fraction is not None and not 0.0 <= obj.eval_fraction < 1.0:
            bad("eval_fraction", f"must be in [0, 1), got {obj.eval_fraction}")
        if obj.max_seq_len < 8:
            bad("max_seq_len", f"must be >= 8, got {obj.max_seq_len}")
    elif isinstance(obj, ReplayConfig):
        if not obj.path:
            bad("path", "data.replay needs a path to a file of general text")
        if not 0.0 < obj.fraction <= 0.5:
            bad("fraction", f"a share of the trained tokens in (0, 0.5], got {obj.fraction}")
    elif isinstance(obj, EvalConfig):
        if obj.retention_max < 1:
            bad("retention_max", f"must be >= 1, got {obj.retention_max}")
        for k in ("generate_every", "generate_sample", "generate_max_tokens"):
            v = getattr(obj, k)
            if v is not None and v < 1:
                bad(k, f"must be >= 1, got {v}")
    elif isinstance(obj, LoraConfig):
        if obj.rank < 1:
            bad("rank", f"must be >= 1, got {obj.rank}")
        if not 0.0 <= obj.dropout < 1.0:
            bad("dropout", f"must be in [0, 1), got {obj.dropout}")
        if isinstance(obj.targets, str) and obj.targets not in ("qv", "attention", "all-linear"):
            bad("targets", f"{obj.targets!r}: use qv, attention, all-linear or a list of module names")
        if isinstance(obj.layers, str) and obj.layers != "all":
            if not (obj.layers.startswith("top:") and obj.layers[4:].isdigit() and int(obj.layers[4:]) > 0):
                bad("layers", f"{obj.layers!r}: use all, top:N or a list of layer indices")
    elif isinstance(obj, ReportConfig):
        if obj.samples < 0 or obj.sample_tokens < 1:
            bad("samples" if obj.samples < 0 else "sample_tokens", "must be >= 0 (samples) and >= 1 (sample_tokens)")
    elif isinstance(obj, TrainConfig):
        if obj.lr is not None and not 0 < obj.lr < 1:
            bad("lr", f"must be in (0, 1), got {obj.lr}")
        if obj.max_skipped_batches < 0:
            bad("max_skipped_batches", f"must be >= 0, got {obj.max_skipped_batches}")
        for k in ("batch_size", "grad_accum", "log_every"):
            if getattr(obj, k) < 1:
                bad(k, f"must be >= 1, got {getattr(obj, k)}")
        if obj.max_steps is not None and obj.max_steps < 1:
            bad("max_steps", f"must be >= 1, got {obj.max_steps}")
        if obj.max_steps is None and obj.epochs <= 0:
            bad("epochs", f"must be > 0, got {obj.epochs}")
        if not 0 <= obj.warmup < 1:
            bad("warmup", f"a fraction of the total steps in [0, 1), got {obj.warmup}")
        if not 0 <= obj.min_lr_ratio <= 1:
            bad("min_lr_ratio", f"must be in [0, 1], got {obj.min_lr_ratio}")
        for k in ("eval_every", "save_every", "eval_batch_size"):
            v = getattr(obj, k)
            if v is not None and v < 1:
                bad(k, f"must be >= 1, got {v}")
    return errors


# --------------------------------------------------------------------------- public API

def _set_path(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def load_config(path: Optional[str | os.PathLike] = None, overrides: tuple[str, ...] | list[str] = ()) -> tuple[Config, list[str]]:
    """Load a YAML config and apply ``a.b=value`` overrides.

    Returns the resolved config and the list of overrides applied (for logging). Relative
    dataset paths are resolved against the config file's folder, so a config works from
    any working directory.
    """
    raw: dict = {}
    base = Path.cwd()
    source, lines = "config", {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"{p}: config file not found")
        if p.is_dir():
            raise ConfigError(f"{p}: is a folder; give the YAML config file")
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not valid UTF-8 ({e.reason} at byte {e.start}); save the config as UTF-8") from None
        try:
            raw = yaml.safe_load(text) or {}
        except RecursionError:
            raise ConfigError(f"{p}: nested too deeply to read") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            loc = f"{p}:{mark.line + 1}" if mark else str(p)
            raise ConfigError(f"{loc}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys")
        raw.setdefault("name", p.stem)
        base = p.resolve().parent
        source, lines = str(p), yaml_key_lines(text)
    applied = []
    set_args: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        key = key.strip()
        try:
            _set_path(raw, key, value)
        except (yaml.YAMLError, RecursionError) as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({getattr(e, 'problem', None) or e}); quote it, e.g. --set '{key}=\"...\"'") from None
        applied.append(f"{key}={value}")
        set_args[key] = item
    try:
        cfg = _build(Config, raw, "")
    except ConfigError as e:
        raise ConfigError(format_errors(e.errors, locator(source, lines, set_args), source), e.errors) from None
    cfg = _resolve_paths(cfg, base)
    return cfg, applied


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def path(s: str) -> str:
        p = Path(os.path.expanduser(s))
        if not p.is_absolute() and not p.exists() and (base / p).exists():
            p = base / p
        return str(p)

    def fix(entry: Any) -> Any:
        return entry if entry is None or not entry.path else dataclasses.replace(entry, path=path(entry.path))

    data = dataclasses.replace(cfg.data, train=[fix(e) for e in cfg.data.train], eval=fix(cfg.data.eval), replay=fix(cfg.data.replay))
    ev = dataclasses.replace(cfg.eval, retention=path(cfg.eval.retention)) if cfg.eval.retention else cfg.eval
    template = cfg.template
    if template.endswith((".jinja", ".jinja2", ".j2")) and "{" not in template:  # a template file, not inline Jinja
        t = Path(os.path.expanduser(template))
        if not t.is_absolute() and not t.exists() and (base / t).exists():
            template = str(base / t)
    return dataclasses.replace(cfg, data=data, eval=ev, template=template)


def config_from_dict(d: dict) -> Config:
    return _build(Config, d, "")


def to_dict(cfg: Any) -> Any:
    return dataclasses.asdict(cfg)


def resolved_config(cfg: Config, *, dtype: Optional[str] = None, eval_every: Optional[int] = None,
                    save_every: Optional[int] = None) -> Config:
    """``cfg`` with every derived default written in (lr, lora.alpha, early_stopping.enabled,
    eval_batch_size, and what the run derived: the compute ``dtype``, ``eval_every``,
    ``save_every``) and dataset paths made absolute, so that the saved ``runs/NAME/config.yaml``
    reruns as is, from any folder. A new object."""
    t = cfg.train
    train = dataclasses.replace(
        t, lr=cfg.lr, eval_batch_size=t.eval_batch_size or t.batch_size,
        eval_every=t.eval_every or eval_every, save_every=t.save_every or save_every,
        early_stopping=dataclasses.replace(t.early_stopping, enabled=cfg.early_stopping_on),
    )
    model = dataclasses.replace(cfg.model, dtype=dtype or cfg.model.dtype)

    def absolute(e: Optional[DatasetEntry]) -> Optional[DatasetEntry]:  # the saved config works from any folder
        return None if e is None or not e.path else dataclasses.replace(e, path=os.path.abspath(e.path))

    data = dataclasses.replace(cfg.data, train=[absolute(e) for e in cfg.data.train], eval=absolute(cfg.data.eval))
    return dataclasses.replace(cfg, model=model, train=train, data=data,
                               lora=dataclasses.replace(cfg.lora, alpha=cfg.lora_alpha))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def allowed_values(tp: Any) -> str:
    """The values a field accepts, for ``config-doc``: ``cosine | linear | ...``, ``true | false``,
    ``integer``, ``number``, ``null`` when optional; '' for free text."""
    inner, optional = _strip_optional(tp)
    origin = typing.get_origin(inner)
    if origin is Literal:
        parts = [str(c) for c in typing.get_args(inner)]
    elif inner is bool:
        parts = ["true", "false"]
    elif inner is int:
        parts = ["integer"]
    elif inner is float:
        parts = ["number"]
    elif origin in (Union, types.UnionType):
        parts = [allowed_values(a) or "text" for a in typing.get_args(inner)]
    elif origin is list:
        (item,) = typing.get_args(inner)
        parts = [f"list of {allowed_values(item) or ('entries' if dataclasses.is_dataclass(item) else 'text')}"]
    else:
        parts = []
    if parts and optional:
        parts.append("null")
    return " | ".join(parts)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) rows for every field, for docs and ``tunelab config-doc``; the fields
    of a list's entries (``data.train``) appear as ``data.train[].path`` etc."""
    return [(k, d, doc) for k, d, doc, _ in describe_full(cls, prefix)]


def describe_full(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, default, doc, allowed values) rows for every field (see :func:`describe`)."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner, _ = _strip_optional(hint)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(inner):
            rows.append((key, "", f.metadata.get("doc", ""), "a mapping" + (" | null" if _strip_optional(hint)[1] else "")))
            rows.extend(describe_full(inner, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip() if not isinstance(default, str) else repr(default)
        rows.append((key, shown, f.metadata.get("doc", ""), allowed_values(hint)))
        if typing.get_origin(inner) is list and dataclasses.is_dataclass(typing.get_args(inner)[0]):
            rows.extend(describe_full(typing.get_args(inner)[0], key + "[]."))
    return rows
