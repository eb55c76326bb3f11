"""``tunelab export RUN --gguf OUT.gguf``: a trained run (adapter merged) as a GGUF file for
llama.cpp / Ollama, written with the ``gguf`` package's writer.

What llama.cpp expects, as its own ``convert_hf_to_gguf.py`` writes it:

* tensor names from ``gguf``'s ``TensorNameMap`` (the same map transformers reverses when it
  loads a GGUF, and that :func:`tunelab.models.load.convert_gguf` relies on);
* for the ``llama`` architecture (Llama, SmolLM2, Mistral) q and k rows permuted from the
  rotate-half RoPE layout of transformers to ggml's interleaved one (Qwen2 uses NEOX RoPE in
  ggml: no permutation);
* 1-D tensors (norms, biases) in F32; matrices in F16, or Q8_0 via ``gguf.quants`` (a matrix
  whose rows are not a multiple of the 32-value Q8_0 block stays F16, as llama.cpp does);
* a tied lm_head is not written (llama.cpp reuses ``token_embd``);
* the tokenizer (BPE vocab, token types, merges, special ids) and the chat template the
  run was trained with.

The round trip is tested by loading the file back with transformers (``gguf_file=``) and
comparing logits with the merged model (tests/test_export_gguf.py).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..files import atomic_write_file
from .load import ModelError, load_base_state_dict, load_tokenizer

log = logging.getLogger("tunelab")

QTYPES = ("f16", "q8_0")
# transformers model_type -> (gguf arch name, permute q/k)
ARCHES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


class ExportError(ModelError):
    """The model cannot be exported; the message says why and what to do."""


@dataclass
class ExportInfo:
    path: Path
    qtype: str
    arch: str
    n_tensors: int
    bytes: int
    types: dict[str, int] = field(default_factory=dict)  # ggml type -> tensor count
    notes: list[str] = field(default_factory=list)


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' rotate-half q/k rows -> ggml's interleaved RoPE rows (llama.cpp's
    ``LlamaModel.permute``; transformers' ``LlamaTensorProcessor`` undoes it on load)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(conf: dict) -> float:
    rp = conf.get("rope_parameters") or {}
    scaling = conf.get("rope_scaling") or {}
    kind = rp.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ExportError(f"RoPE scaling {kind!r} is not supported by the GGUF export yet (only unscaled RoPE); use tunelab merge")
    return float(rp.get("rope_theta", conf.get("rope_theta", 10000.0)))


def _pre_tokenizer(conf: dict, n_vocab: int) -> tuple[str, Optional[str]]:
    """llama.cpp's ``tokenizer.ggml.pre`` (its pre-tokenizer regex family) and a note if guessed."""
    if conf["model_type"] == "qwen2":
        return "qwen2", None
    if n_vocab == 49152:
        return "smollm", None  # SmolLM / SmolLM2's tokenizer
    if n_vocab >= 128000 and conf["model_type"] == "llama":
        return "llama-bpe", None  # Llama 3
    return "default", "tokenizer.ggml.pre set to 'default' (GPT-2 pre-tokenizer): check llama.cpp tokenizes as the original"


def _token_types(tok: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    import gguf

    vocab = tok.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    added = {t.content: t for t in getattr(tok, "added_tokens_decoder", {}).values()}
    tokens, types = [], []
    for i in range(n_vocab):
        t = reverse.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[t].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def export_model_dir(model_dir: str | Path, out: str | Path, qtype: str = "f16", chat_template: Optional[str] = None,
                     name: Optional[str] = None) -> ExportInfo:
    """A transformers model dir (safetensors) -> a GGUF file at ``out`` (written atomically)."""
    import gguf

    if qtype not in QTYPES:
        raise ExportError(f"--type {qtype!r}: use one of {', '.join(QTYPES)}")
    model_dir, out = Path(model_dir), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new output file")
    conf = json.loads((model_dir / "config.json").read_text())
    mtype = conf.get("model_type")
    if mtype not in ARCHES:
        raise ExportError(f"GGUF export supports the Llama family ({', '.join(ARCHES)}), not model_type {mtype!r}; use tunelab merge")
    arch_name, permute = ARCHES[mtype]
    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    n_layer, n_head = conf["num_hidden_layers"], conf["num_attention_heads"]
    n_kv = conf.get("num_key_value_heads") or n_head
    hidden = conf["hidden_size"]
    head_dim = conf.get("head_dim") or hidden // n_head
    n_vocab = conf["vocab_size"]
    notes: list[str] = []
    rope_theta = _rope_theta(conf)

    sd = load_base_state_dict(str(model_dir))
    tied = conf.get("tie_word_embeddings", False) or (
        "lm_head.weight" in sd and torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"]))
    tok = load_tokenizer(str(model_dir))
    spec = json.loads(tok.backend_tokenizer.to_str()) if getattr(tok, "backend_tokenizer", None) is not None else {}
    if spec.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ExportError("GGUF export supports byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2) only; "
                          "SentencePiece-style tokenizers (Llama 2, Mistral v0.1-v0.3) are not supported yet")

    names = gguf.get_tensor_name_map(arch, n_layer)
    ftype = gguf.LlamaFileType.MOSTLY_F16 if qtype == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    types: dict[str, int] = {}

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch_name)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or conf.get("_name_or_path") or model_dir.name)
        w.add_context_length(conf.get("max_position_embeddings", 2048))
        w.add_embedding_length(hidden)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(conf["intermediate_size"])
        w.add_head_count(n_head)
        w.add_head_count_kv(n_kv)
        w.add_rope_dimension_count(head_dim)
        if head_dim != hidden // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_rope_freq_base(rope_theta)
        w.add_layer_norm_rms_eps(conf.get("rms_norm_eps", 1e-6))
        w.add_vocab_size(n_vocab)
        w.add_file_type(ftype)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

        # tokenizer: byte-level BPE ("gpt2" in ggml), vocab padded to the embedding rows
        tokens, toktypes = _token_types(tok, n_vocab)
        pre, note = _pre_tokenizer(conf, n_vocab)
        if note:
            notes.append(note)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(toktypes)
        with tempfile.TemporaryDirectory() as td:
            tok.save_pretrained(td)
            special = gguf.SpecialVocab(td, load_merges=True, n_vocab=n_vocab)
        special.chat_template = chat_template or getattr(tok, "chat_template", None)
        special.add_to_gguf(w, quiet=True)

        for key in sorted(sd, key=_order):
            t = sd[key]
            if key == "lm_head.weight" and tied:
                continue
            if key.endswith("rotary_emb.inv_freq"):
                continue
            base, suffix = key.rsplit(".", 1)
            gname = names.get_name(base)
            if gname is None:
                raise ExportError(f"{model_dir}: tensor {key!r} has no GGUF name for architecture {arch_name!r}")
            t = t.float()
            if permute and base.endswith("self_attn.q_proj"):
                t = permute_qk(t, n_head)
            elif permute and base.endswith("self_attn.k_proj"):
                t = permute_qk(t, n_kv)
            data = t.numpy()
            if data.ndim == 1:
                w.add_tensor(f"{gname}.{suffix}", data.astype(np.float32))
                types["F32"] = types.get("F32", 0) + 1
            elif qtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
                q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                w.add_tensor(f"{gname}.{suffix}", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                types["Q8_0"] = types.get("Q8_0", 0) + 1
            else:
                w.add_tensor(f"{gname}.{suffix}", data.astype(np.float16))
                types["F16"] = types.get("F16", 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write_file(out, write)
    return ExportInfo(out, qtype, arch_name, sum(types.values()), out.stat().st_size, types, notes)


def _order(key: str) -> tuple:
    """Embeddings first, then the blocks in order, then the final norm and head (llama.cpp's order)."""
    parts = key.split(".")
    if "layers" in parts:
        return (1, int(parts[parts.index("layers") + 1]), key)
    return (0 if "embed" in key else 2, 0, key)


def export_run(run: str | Path, out: str | Path, qtype: str = "f16") -> ExportInfo:
    """A run dir (LoRA/QLoRA: the adapter merged first, as ``tunelab merge`` does; full: its
    model) or a plain transformers model dir -> GGUF."""
    from ..config import load_config
    from ..data.render import template_source
    from .merge import merge_run

    run = Path(run)
    if (run / "config.yaml").exists():
        cfg, _ = load_config(run / "config.yaml")
        template = template_source(cfg.template) if cfg.template != "auto" else None
        if cfg.method == "full":
            return export_model_dir(run / "model", out, qtype, template, name=cfg.name)
        with tempfile.TemporaryDirectory(prefix=".export-", dir=Path(out).parent if Path(out).parent.exists() else None) as td:
            merged = merge_run(run, Path(td) / "merged")
            return export_model_dir(merged, out, qtype, template, name=cfg.name)
    if (run / "config.json").exists():
        return export_model_dir(run, out, qtype)
    raise FileNotFoundError(f"{run}: neither a run dir (config.yaml) nor a model dir (config.json)")
