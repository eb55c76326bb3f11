"""No code from a file runs unless the user says so: no pickle, no remote code, sandboxed chat
templates, and paths inside data records are never opened."""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tinymodels import write_jsonl
from tunelab.data.formats import load_dataset_file
from tunelab.data.render import Renderer, TemplateError
from tunelab.models.load import ModelError, load_model
from tunelab.train.checkpoint import PickleRefused, load_pt


class Payload:
    """Unpickling this touches a file: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_checkpoint_is_refused_unless_allowed(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"state": {}, "param_groups": [], "x": Payload(marker)}, tmp_path / "optimizer.pt")
    with pytest.raises(PickleRefused, match="--allow-pickle"):
        load_pt(tmp_path / "optimizer.pt")
    assert not marker.exists()
    load_pt(tmp_path / "optimizer.pt", allow_pickle=True)
    assert marker.exists()  # what --allow-pickle means: the file's code runs
    torch.save({"step": torch.tensor(3)}, tmp_path / "plain.pt")  # tensors and containers need no pickle
    assert int(load_pt(tmp_path / "plain.pt")["step"]) == 3


def test_pickle_model_weights_are_refused_unless_allowed(tmp_path, tiny_model_dir):
    d = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, d)
    from safetensors.torch import load_file

    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    with pytest.raises(ModelError, match=r"pytorch_model\.bin.*--allow-pickle"):
        load_model(str(d), torch.float32)
    assert load_model(str(d), torch.float32, allow_pickle=True) is not None


def test_trust_remote_code_is_off_unless_set(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tunelab.config import Config

    seen = {}
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda path, **kw: seen.update(kw) or object())
    assert Config().model.trust_remote_code is False and Config().model.allow_pickle is False
    load_model(tiny_model_dir, torch.float32)
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True


EVIL = ("{{ cycler.__init__.__globals__.os.system('touch MARKER') }}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}")


def test_a_chat_template_reaching_python_internals_fails_in_the_sandbox(tmp_path, tokenizer):
    marker = tmp_path / "pwned"
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = EVIL.replace("MARKER", str(marker))
    r = Renderer(tok, "auto")
    with pytest.raises(TemplateError, match="sandbox forbids"):
        r.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert not marker.exists()
    tok.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(TemplateError):
        Renderer(tok, "auto").render([{"role": "user", "content": "hi"}])


def test_paths_inside_data_records_are_never_opened(tmp_path, tokenizer):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    rows = [
        {"instruction": "Describe the image.", "output": "A cat.", "image": str(secret), "images": [str(secret)], "include": str(secret)},
        {"messages": [{"role": "user", "content": [{"type": "image", "path": str(secret)}]}, {"role": "assistant", "content": "x"}]},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows[:1])
    opened = []

    def hook(event, args):
        if event == "open" and args and str(args[0]) == str(secret):
            opened.append(args)

    sys.addaudithook(hook)  # cannot be removed; it only records opens of this one file
    ds = load_dataset_file(data)
    text = Renderer(tokenizer, "chatml").render(ds.conversations[0].messages)
    assert "TOP-SECRET-CONTENT" not in text and str(secret) not in text
    write_jsonl(tmp_path / "m.jsonl", rows[1:])
    with pytest.raises(Exception, match="content must be a string"):
        load_dataset_file(tmp_path / "m.jsonl")
    assert opened == []
    assert json.loads(data.read_text().splitlines()[0])["image"] == str(secret)  # the file itself is untouched
