"""How config mistakes are told: every error at once, each where it was made, with a did-you-mean.

* :class:`ConfigError` carries a list of ``(key path, message)`` entries, so a loader can
  collect every problem of a config and raise once.
* :func:`yaml_key_lines` maps each key path of a YAML document (``train.lr``,
  ``data.train[0].path``) to its line, and :func:`format_errors` prefixes each message with
  ``FILE:LINE`` (or ``--set KEY=VALUE`` when the value came from the command line).
* :data:`FOREIGN_KEYS` maps the names users bring from Hugging Face ``TrainingArguments``,
  PEFT, Axolotl and LLaMA-Factory (``learning_rate``, ``num_train_epochs``, ``lora_r``, ...)
  to tunelab's key, for :func:`suggest_key`.

This module imports nothing of tunelab (layer 0): ``config.py`` uses it.
"""

from __future__ import annotations

import difflib
from typing import Callable, Iterable, Optional

import yaml


class ConfigError(ValueError):
    """A config problem the user must fix; the message says where and how.

    ``errors``: every ``(key path, message)`` found (one entry when raised for one problem)."""

    def __init__(self, message: str, errors: Optional[list[tuple[str, str]]] = None):
        super().__init__(message)
        self.errors = errors if errors is not None else [("", message)]


# name elsewhere -> (tunelab key, note on the meaning when it differs)
FOREIGN_KEYS: dict[str, tuple[str, str]] = {
    "learning_rate": ("train.lr", ""),
    "num_train_epochs": ("train.epochs", ""),
    "num_epochs": ("train.epochs", ""),
    "per_device_train_batch_size": ("train.batch_size", ""),
    "micro_batch_size": ("train.batch_size", ""),
    "train_batch_size": ("train.batch_size", ""),
    "per_device_eval_batch_size": ("train.eval_batch_size", ""),
    "gradient_accumulation_steps": ("train.grad_accum", ""),
    "warmup_ratio": ("train.warmup", ""),
    "warmup_steps": ("train.warmup", "a fraction of the total steps, not a count"),
    "lr_scheduler_type": ("train.schedule", ""),
    "lr_scheduler": ("train.schedule", ""),
    "eval_steps": ("train.eval_every", ""),
    "save_steps": ("train.save_every", ""),
    "logging_steps": ("train.log_every", ""),
    "save_total_limit": ("train.keep_checkpoints", ""),
    "early_stopping_patience": ("train.early_stopping.patience", ""),
    "lora_r": ("lora.rank", ""),
    "lora_rank": ("lora.rank", ""),
    "r": ("lora.rank", ""),
    "lora_alpha": ("lora.alpha", ""),
    "lora_dropout": ("lora.dropout", ""),
    "lora_target_modules": ("lora.targets", ""),
    "lora_target": ("lora.targets", ""),
    "target_modules": ("lora.targets", ""),
    "max_seq_length": ("data.max_seq_len", ""),
    "sequence_len": ("data.max_seq_len", ""),
    "cutoff_len": ("data.max_seq_len", ""),
    "max_length": ("data.max_seq_len", ""),
    "val_set_size": ("data.eval_fraction", ""),
    "datasets": ("data.train", "a list of {path: FILE}"),
    "dataset": ("data.train", "a list of {path: FILE}"),
    "train_on_inputs": ("data.train_on", "all (train on prompts too) or assistant"),
    "base_model": ("model.name", ""),
    "model_name_or_path": ("model.name", ""),
    "bf16": ("model.dtype", "bf16 | fp32 | auto"),
    "torch_dtype": ("model.dtype", "bf16 | fp32 | auto"),
    "adapter": ("method", "lora | qlora | full"),
    "finetuning_type": ("method", "lora | qlora | full"),
    "chat_template": ("template", ""),
    "output_dir": ("output_dir", ""),
}


def _render_suggestion(target: str, foreign: Optional[str] = None) -> str:
    if foreign is None:
        return f"did you mean {target!r}?"
    note = FOREIGN_KEYS[foreign][1]
    return f"did you mean {target!r}? ({foreign!r} is the name in HF/Axolotl/LLaMA-Factory configs" + (f"; here {note})" if note else ")")


def suggest_key(key: str, where: str, fields: Iterable[str], leaves: dict[str, list[str]]) -> Optional[str]:
    """A did-you-mean for the unknown ``key`` found under ``where`` (a dotted path, '' at the top).

    ``fields``: the valid keys at ``where``; ``leaves``: every tunelab key name -> its full
    dotted paths (to point ``lr`` given at the top level to ``train.lr``)."""
    fields = list(fields)
    prefix = where + "." if where else ""
    k = str(key)
    if k in FOREIGN_KEYS:
        return _render_suggestion(FOREIGN_KEYS[k][0], k)
    close = difflib.get_close_matches(k, fields, n=1, cutoff=0.5)
    if close:
        return _render_suggestion(prefix + close[0])
    if k in leaves:  # a tunelab key in the wrong section
        return _render_suggestion(" or ".join(leaves[k]) if len(leaves[k]) > 1 else leaves[k][0])
    foreign = difflib.get_close_matches(k, list(FOREIGN_KEYS), n=1, cutoff=0.8)
    if foreign:
        return _render_suggestion(FOREIGN_KEYS[foreign[0]][0], foreign[0])
    return None


def yaml_key_lines(text: str) -> dict[str, int]:
    """Key path -> 1-based line of every mapping key and list item in a YAML document.

    Paths look like the config's error paths: ``train.lr``, ``data.train[0].path``. A document
    that does not parse gives an empty map (the parse error is reported elsewhere)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    out: dict[str, int] = {}

    def walk(node: yaml.Node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for knode, vnode in node.value:
                p = f"{path}.{knode.value}" if path else str(knode.value)
                out.setdefault(p, knode.start_mark.line + 1)
                walk(vnode, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                p = f"{path}[{i}]"
                out.setdefault(p, item.start_mark.line + 1)
                walk(item, p)

    if root is not None:
        walk(root, "")
    return out


def locator(source: str, lines: dict[str, int], set_args: dict[str, str]) -> Callable[[str], str]:
    """A function: error key path -> where to look (``--set ARG``, ``FILE:LINE`` or ``FILE``).

    ``set_args``: dotted key -> the ``--set`` argument that gave it; a value from ``--set`` is
    blamed on that argument, never on the file."""

    def prefixes(path: str) -> list[str]:
        out, cur = [], ""
        for part in path.replace("[", ".[").split("."):
            if not part:
                continue
            cur = cur + part if part.startswith("[") or not cur else f"{cur}.{part}"
            out.append(cur)
        return out[::-1]  # longest first

    def locate(path: str) -> str:
        for p in prefixes(path):
            if p in set_args:
                return f"--set {set_args[p]}"
        for p in prefixes(path):
            if p in lines:
                return f"{source}:{lines[p]}"
        return source

    return locate


def format_errors(errors: list[tuple[str, str]], locate: Callable[[str], str], source: str) -> str:
    """One line for one error; a count line and one indented line per error otherwise."""
    lines = [f"{locate(path)}: {msg}" for path, msg in errors]
    if len(lines) == 1:
        return lines[0]
    return f"{source}: {len(lines)} config errors:\n" + "\n".join("  " + line for line in lines)
