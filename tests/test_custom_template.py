"""Custom templates (a .jinja file or an inline string): the parity checks of the built-ins,
refusal with the reason when they break, and ``tunelab preview`` showing them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tinymodels import write_jsonl
from tunelab.cli import main
from tunelab.data.formats import Conversation
from tunelab.data.render import BUILTIN_TEMPLATES, Renderer, TemplateError, TemplateParityError

# A template of its own: "Q: ... / A: ..." with the eos closing each answer.
QA_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n"
               "{% elif m['role'] == 'user' %}Q: {{ m['content'] }}\n{% else %}A: {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}A:{% endif %}")


def test_file_and_inline_templates_render_and_train_the_answer(tmp_path, tokenizer):
    f = tmp_path / "qa.jinja"
    f.write_text(QA_TEMPLATE)
    conv = Conversation([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    for template, name in ((str(f), f"template file {f}"), (QA_TEMPLATE, "inline template")):
        r = Renderer(tokenizer, template)
        assert r.template_name == name
        seg = r.segments(conv)
        assert "".join(s["text"] for s in seg["segments"]) == f"Q: 2+2?\nA: 4{tokenizer.eos_token}\n"
        assert [s["text"] for s in seg["segments"] if s["trained"]] == [f" 4{tokenizer.eos_token}"]
        assert r.prompt_ids(conv.messages[:1]) == tokenizer("Q: 2+2?\nA:", add_special_tokens=False)["input_ids"]
    # the built-in chatml, given as a file, renders exactly as the built-in
    (tmp_path / "chatml.jinja").write_text(BUILTIN_TEMPLATES["chatml"])
    assert Renderer(tokenizer, str(tmp_path / "chatml.jinja")).render(conv.messages) == Renderer(tokenizer, "chatml").render(conv.messages)


def test_template_that_breaks_parity_is_refused_with_the_reason(tmp_path, tokenizer):
    # the generation cue says "Answer:" but training writes "A:": inference would see another format
    bad = QA_TEMPLATE.replace("{% if add_generation_prompt %}A:{% endif %}", "{% if add_generation_prompt %}Answer:{% endif %}")
    with pytest.raises(TemplateParityError, match="refused: template 'inline template' is not prefix-stable at message 2"):
        Renderer(tokenizer, bad)
    # a cue that depends on the turn count renders the second prompt differently from the training text
    drift = QA_TEMPLATE.replace("{% if add_generation_prompt %}A:{% endif %}", "{% if add_generation_prompt %}A{{ messages|length }}:{% endif %}")
    with pytest.raises(TemplateParityError, match="not prefix-stable"):
        Renderer(tokenizer, drift)
    with pytest.raises(TemplateError, match="does not render: TemplateSyntaxError"):
        Renderer(tokenizer, "{% for m in messages %}{{ m['content'] }")
    with pytest.raises(TemplateError, match="not found"):
        Renderer(tokenizer, str(tmp_path / "missing.jinja"))
    with pytest.raises(TemplateError, match="unknown template 'chatm'"):
        Renderer(tokenizer, "chatm")


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, timeout=300, env=dict(os.environ), **kw)


def test_cli_preview_shows_a_file_template_and_refuses_a_broken_one(tmp_path, tiny_model_dir, capsys):
    write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"Say {k}", "output": f"{k}!"} for k in range(3)])
    (tmp_path / "qa.jinja").write_text(QA_TEMPLATE)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model:\n  name: {tiny_model_dir}\ntemplate: qa.jinja\ndata:\n  train:\n    - path: d.jsonl\n")
    r = _run(["preview", str(cfg), "-n", "1"], cwd="/")  # the template file is found next to the config
    assert r.returncode == 0, r.stderr
    assert "Q: Say 0" in r.stdout and f"template: template file {tmp_path / 'qa.jinja'}" in r.stdout
    assert main(["preview", str(cfg), "-n", "1", "--json"]) == 0
    seg = json.loads(next(x for x in capsys.readouterr().out.splitlines() if x.startswith("{")))
    assert [s["text"] for s in seg["segments"] if s["trained"]] == [" 0!<|im_end|>"]  # SmolLM2's eos is <|im_end|>
    (tmp_path / "qa.jinja").write_text(QA_TEMPLATE.replace("A:{% endif %}", "Answer:{% endif %}"))
    assert main(["preview", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "tunelab: error: refused: template" in err and "not prefix-stable" in err
