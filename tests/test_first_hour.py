"""The first hour as a new user lives it, through the real CLI (subprocesses, output asserted):
a quiet console with one header and a final summary, truncation never silent, every ordinary
mistake one line with exit code 2, Ctrl-C one line with exit code 130, a chat that behaves
like a REPL, the spot check where the report is, reviewer marks applied, config-doc values."""

from __future__ import annotations

import csv
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from tinymodels import write_jsonl
from tunelab.config import load_config
from tunelab.data.truncation import length_keeping, truncation_summary

REPO = Path(__file__).resolve().parents[1]
NOISE = ("Loading weights", "FutureWarning", "kernels-community", "Traceback", "it/s]")


def cli(*args: str, cwd: Path, env: dict | None = None, input: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "tunelab", *args], cwd=cwd, env=e, input=input, capture_output=True,
                          text=True, timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunelab: error: "), proc.stderr
    return lines[0]


def _records(n_short: int = 36, n_long: int = 4) -> list[dict]:
    rows = [{"instruction": f"Say the number {k}.", "input": "", "output": f"{k}!"} for k in range(n_short)]
    rows += [{"instruction": "Repeat: " + " ".join(f"word{j}" for j in range(60 + 5 * k)), "input": "", "output": "done"} for k in range(n_long)]
    return rows


def _project(tmp_path: Path, model_dir: str, extra: str = "") -> Path:
    proj = tmp_path / "proj"
    proj.mkdir(exist_ok=True)
    write_jsonl(proj / "train.jsonl", _records())
    write_jsonl(proj / "eval.jsonl", [{"instruction": f"Say the word {w}.", "input": "", "output": f"{w}!"} for w in ("cat", "dog", "sun", "sea")])
    (proj / "run.yaml").write_text(
        f"name: first\nmodel:\n  name: {model_dir}\n  dtype: fp32\ntemplate: chatml\n"
        f"data:\n  train:\n    - path: train.jsonl\n  eval: eval.jsonl\n  max_seq_len: 48\n{extra}"
        "lora:\n  rank: 4\ntrain:\n  max_steps: 3\n  batch_size: 4\n  eval_every: 3\n")
    return proj


# --------------------------------------------------------------------------- the run's console

def test_train_console_header_truncation_resolved_config_and_summary(tmp_path, tiny_model_dir, tokenizer):
    from tunelab.data.formats import load_dataset_file
    from tunelab.data.render import Renderer

    proj = _project(tmp_path, tiny_model_dir)
    proc = cli("train", "run.yaml", "--set", "train.lr=1e-3", cwd=proj)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for noise in NOISE:
        assert noise not in out, f"{noise!r} in the console:\n{out}"
    # one compact header: model, method, data kept/dropped, resolved hyperparameters, overrides
    assert re.search(r"^model +.*llama.*frozen base fp32", out, re.M), out
    assert re.search(r"^method +lora +rank 4, alpha 8 \(2 x rank\)", out, re.M), out
    assert re.search(r"^data +train 36 of 40 records kept \(4 dropped\) from train\.jsonl \(alpaca\)", out, re.M), out
    assert re.search(r"^ +eval 4 of 4 records kept from eval\.jsonl", out, re.M), out
    assert re.search(r"^train +lr 0\.001, cosine, .*effective batch 4 \(4 x 1 accumulation x 1 process\(es\)\)", out, re.M), out
    assert "3 steps" in out and "early stopping on (patience 3)" in out
    assert re.search(r"^overridden train\.lr=1e-3$", out, re.M), out
    assert "trainable fp32" in out and "frozen fp32" in out  # the parameter table, labelled by precision
    # truncation is a warning with the count and the length that keeps 99% of the records
    ds = load_dataset_file(str(proj / "train.jsonl"), "auto", "raise")
    _, st = Renderer(tokenizer, "chatml").encode_many(ds.conversations, None)
    keep = length_keeping(st.lengths)
    assert sum(n > 48 for n in st.lengths) == 4 and keep > 48
    assert (f"warning: train: 4 of 40 records (10.0%) are longer than max_seq_len 48 (truncation: drop): 4 dropped; "
            f"max_seq_len {keep} keeps 99% of the records (--set data.max_seq_len={keep})") in out, out
    # plain (non-TTY) progress lines with step/total, elapsed and ETA
    assert re.search(r"^  step 1/3  train_loss \d+\.\d{4}  lr [0-9.e+-]+  \d+ tok/s  elapsed 0:00:\d\d  eta 0:\d\d:\d\d$", out, re.M), out
    assert re.search(r"^  step 3/3  eval_loss \d+\.\d{4}", out, re.M), out
    # final summary: where everything is, and the next commands
    run = Path("runs") / "first"
    assert re.search(r"^done: 3 steps in .*best eval loss", out, re.M), out
    for name in ("adapter", "config", "metrics", "audit", "spot check"):
        assert re.search(rf"^  {name} +{re.escape(str(run))}", out, re.M), (name, out)
    assert f"tunelab generate {run}" in out and f"tunelab chat {run}" in out and f"tunelab merge {run} --out" in out
    # runs/NAME/config.yaml: the resolved config, derived values filled in, rerunnable as is
    saved = yaml.safe_load((proj / run / "config.yaml").read_text())
    assert saved["train"]["lr"] == 1e-3 and saved["lora"]["alpha"] == 8.0 and saved["train"]["early_stopping"]["enabled"] is True
    assert saved["train"]["eval_every"] == 3 and saved["train"]["save_every"] == 3 and saved["train"]["eval_batch_size"] == 4
    assert saved["model"]["dtype"] == "fp32" and saved["data"]["train"][0]["path"] == str(proj / "train.jsonl")
    again, _ = load_config(proj / run / "config.yaml")
    assert again.lr == 1e-3 and again.lora_alpha == 8.0 and again.early_stopping_on
    # the audit's spot check and report are in the run dir, with normal permissions; nothing in the cwd
    umask = os.umask(0o022)
    os.umask(umask)
    for f in ("audit-spotcheck.html", "audit.json"):
        mode = (proj / run / f).stat().st_mode & 0o777
        assert mode == 0o666 & ~umask, (f, oct(mode))
    assert sorted(p.name for p in proj.iterdir()) == ["eval.jsonl", "run.yaml", "runs", "train.jsonl"]
    audit = json.loads((proj / run / "audit.json").read_text())  # the audit speaks of the configured truncation
    assert audit["lengths"]["truncation_model"].startswith("data.truncation: drop")
    msgs = {f["code"]: f["message"] for f in audit["findings"]}
    assert "4 records are longer than max_seq_len=48 tokens and will be dropped: not trained (truncation: drop" in msgs["over_max_seq_len"]
    assert "completion_truncated" not in msgs and "right truncation" not in json.dumps(audit["findings"])


def test_quiet_unless_verbose(monkeypatch):
    import logging

    from tunelab.console import NOISY_LOGGERS, quiet_libraries

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    levels = {n: logging.getLogger(n).level for n in NOISY_LOGGERS}
    try:
        quiet_libraries(verbose=True)  # -v: the libraries' own output
        assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ and logging.getLogger("bitsandbytes").level == logging.INFO
        quiet_libraries(verbose=False)
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
        assert all(logging.getLogger(n).level == logging.ERROR for n in NOISY_LOGGERS)
    finally:
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)
        from transformers.utils import logging as tlog

        tlog.enable_progress_bar()


def test_truncation_summary_hand_computed():
    lengths = list(range(1, 101))  # 1..100 tokens
    s = truncation_summary(lengths, 97, "drop")
    assert (s.records, s.over, s.dropped, s.cut, s.keeps_99, s.longest) == (100, 3, 3, 0, 99, 100)
    assert s.warn and "3 of 100 records (3.0%)" in s.line() and "--set data.max_seq_len=99" in s.line()
    s = truncation_summary(lengths, 98, "truncate_prompt")
    assert (s.over, s.dropped, s.cut) == (2, 0, 2) and not s.warn  # 2% is not more than 2%
    assert "prompt-truncated" in s.line()
    assert truncation_summary([], 8, "drop").keeps_99 == 0 and length_keeping([5] * 99 + [500]) == 5


# --------------------------------------------------------------------------- preview and audit follow the config

def test_preview_applies_max_seq_len_and_truncation(tmp_path, tiny_model_dir):
    proj = _project(tmp_path, tiny_model_dir)
    rows = [json.loads(line) for line in (proj / "train.jsonl").read_text().splitlines()]
    write_jsonl(proj / "train.jsonl", [rows[-1], rows[0]])  # a long record first
    proc = cli("preview", "run.yaml", "-n", "2", "--json", "--set", "data.truncation=truncate_prompt", cwd=proj)
    assert proc.returncode == 0, proc.stderr
    long_, short = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert long_["status"] == "truncated" and long_["n_tokens_full"] > 48 and short["status"] == "kept"
    assert long_["n_tokens"] == 48 and long_["n_trained"] > 0
    text = cli("preview", "run.yaml", "-n", "2", cwd=proj)  # truncation: drop
    assert re.search(r"train\.jsonl:1  tokens 0  trained 0 .*\nDROPPED: \d+ tokens > max_seq_len 48 \(truncation: drop\); not trained\n", text.stdout), text.stdout
    assert re.search(r"warning: train: 1 of 2 records \(50\.0%\) are longer than max_seq_len 48", text.stdout), text.stdout


def test_audit_wording_follows_the_configured_truncation(tmp_path, tiny_model_dir):
    # (truncation: drop is checked on the training run's audit.json above)
    proj = _project(tmp_path, tiny_model_dir)
    proc = cli("audit", "--config", "run.yaml", "--set", "data.truncation=truncate_prompt", "--sample", "0", "--json", "-", cwd=proj)
    rep = json.loads(proc.stdout)
    msgs = {f["code"]: f["message"] for f in rep["findings"]}
    assert "will be trained with the prompt cut from the left (truncation: truncate_prompt" in msgs["over_max_seq_len"], msgs
    assert "completion_truncated" not in msgs and "right truncation" not in json.dumps(rep["findings"])


# --------------------------------------------------------------------------- mistakes: one line, exit 2

def test_all_config_errors_at_once_with_lines_and_hf_names(tmp_path):
    (tmp_path / "bad.yaml").write_text(
        "model:\n  name: x\n"            # 1-2
        "data:\n  train: [d.jsonl]\n"    # 3-4
        "  max_seq_length: 512\n"        # 5
        "learning_rate: 2e-4\n"          # 6
        "train:\n"                       # 7
        "  num_train_epochs: 3\n"        # 8
        "  per_device_train_batch_size: 4\n"  # 9
        "  gradient_accumulation_steps: 2\n"  # 10
        "  warmup_ratio: 0.1\n"          # 11
        "  schedule: cosin\n"            # 12
        "lora:\n  lora_r: 8\n  rank: 0\n")  # 13-15
    proc = cli("train", "bad.yaml", "--set", "train.lr=abc", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr
    assert err.startswith("tunelab: error: bad.yaml: 10 config errors:\n"), err
    for want in ("bad.yaml:5: unknown config key 'data.max_seq_length'; did you mean 'data.max_seq_len'?",
                 "bad.yaml:6: unknown config key 'learning_rate'; did you mean 'train.lr'?",
                 "bad.yaml:8: unknown config key 'train.num_train_epochs'; did you mean 'train.epochs'?",
                 "bad.yaml:9: unknown config key 'train.per_device_train_batch_size'; did you mean 'train.batch_size'?",
                 "bad.yaml:10: unknown config key 'train.gradient_accumulation_steps'; did you mean 'train.grad_accum'?",
                 "bad.yaml:11: unknown config key 'train.warmup_ratio'; did you mean 'train.warmup'?",
                 "bad.yaml:12: train.schedule: 'cosin' is not one of ['cosine', 'linear', 'constant_with_warmup']; did you mean 'cosine'?",
                 "bad.yaml:14: unknown config key 'lora.lora_r'; did you mean 'lora.rank'?",
                 "bad.yaml:15: lora.rank: must be >= 1, got 0",
                 "--set train.lr=abc: train.lr: expected a number, got 'abc'"):
        assert "\n  " + want in err, (want, err)
    assert "'learning_rate' is the name in HF/Axolotl/LLaMA-Factory configs" in err
    debug = cli("train", "bad.yaml", "--debug", cwd=tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "tunelab: error: bad.yaml: 9 config errors" in debug.stderr


def test_bad_set_value_names_the_set_argument(tmp_path):
    (tmp_path / "ok.yaml").write_text("data:\n  train: [d.jsonl]\n")
    line = one_error_line(cli("preview", "ok.yaml", "--set", "train.batch_size=two", cwd=tmp_path))
    assert line == "tunelab: error: --set train.batch_size=two: train.batch_size: expected an integer, got 'two'"
    line = one_error_line(cli("preview", "ok.yaml", "--set", "train.learning_rate=1e-4", cwd=tmp_path))
    assert line.startswith("tunelab: error: --set train.learning_rate=1e-4: unknown config key") and "did you mean 'train.lr'" in line


def test_bad_model_path_and_offline_hub_id(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "m.yaml").write_text("model:\n  name: ./models/nope\ndata:\n  train: [d.jsonl]\n")
    line = one_error_line(cli("preview", "m.yaml", cwd=tmp_path))
    assert "model.name: ./models/nope does not exist" in line and "a .gguf file" in line and "Hugging Face id" in line
    line = one_error_line(cli("preview", "m.yaml", "--set", "model.name=nobody/no-such-model", cwd=tmp_path,
                              env={"HF_HUB_OFFLINE": "1"}))
    assert "model.name 'nobody/no-such-model'" in line and "HF_HUB_OFFLINE=1" in line and "hf download nobody/no-such-model" in line
    assert "local dir or a .gguf file" in line


def test_dataset_that_is_not_a_file(tmp_path):
    (tmp_path / "hub.yaml").write_text("data:\n  train: [tatsu-lab/alpaca]\n")
    line = one_error_line(cli("preview", "hub.yaml", "--set", "model.name=smollm2-135m-instruct", cwd=tmp_path))
    assert "tatsu-lab/alpaca: not a file; it looks like a Hugging Face dataset id" in line
    assert ".jsonl, .json, .csv or .parquet" in line and "write the entry as {hub: tatsu-lab/alpaca}" in line
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.jsonl").write_text("")
    line = one_error_line(cli("audit", "folder", "--no-tokenizer", cwd=tmp_path))
    assert "folder: a folder, but not one written by datasets' save_to_disk" in line and "a.jsonl" in line


def test_version():
    from importlib.metadata import version

    proc = cli("--version", cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.strip() == f"tunelab {version('tunelab')}"


def test_config_doc_lists_allowed_values_and_dataset_entry_fields():
    out = cli("config-doc", cwd=REPO).stdout
    assert re.search(r"^train\.schedule +'cosine' +LR schedule.*\n +allowed: cosine \| linear \| constant_with_warmup$", out, re.M), out
    for key in ("data.train[].path", "data.train[].format", "data.train[].weight", "data.train[].name", "data.eval.path"):
        assert re.search(rf"^{re.escape(key)} ", out, re.M), key
    assert "allowed: auto | alpaca | dolly | flan | sharegpt | messages | text" in out
    assert re.search(r"^train\.lr +null .*\n +allowed: number \| null$", out, re.M)


# --------------------------------------------------------------------------- chat, Ctrl-C

def test_chat_is_a_repl(tmp_path, tiny_model_dir):
    script = "\n/help\n/system Be brief.\n/system\nhello\n/reset\ny\n/nope\n/exit\nnot sent\n"
    proc = cli("chat", tiny_model_dir, "--template", "chatml", "--max-new-tokens", "4", cwd=tmp_path, input=script)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.index("commands:") > out.index("you> you> ")  # the empty line did nothing: the next prompt came
    assert "/reset" in out and "system: Be brief." in out and "assistant> " in out
    assert "forget the conversation (1 exchange)? [y/N] conversation cleared (the system message stays)" in out
    assert "unknown command /nope; /help lists the commands" in out
    assert out.count("assistant> ") == 1  # /help, /system, /reset, /nope never reach the model


def test_chat_ctrl_d_exits_and_empty_lines_do_nothing():
    from tunelab.infer.chat import Chat

    lines, out = iter(["", "   ", ""]), []

    def read_then_eof(prompt: str) -> str:  # three empty lines, then Ctrl-D
        out.append(prompt)
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    Chat(None, None, {}, read=read_then_eof, write=out.append).loop()  # never generates: no model needed
    assert out.count("you> ") == 4 and out[-1] == "\n"


def test_ctrl_c_is_one_line_exit_130(tmp_path, tiny_model_dir):
    proc = subprocess.Popen([sys.executable, "-u", "-m", "tunelab", "chat", tiny_model_dir, "--template", "chatml"], cwd=tmp_path,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, deadline = b"", time.monotonic() + 240
    while b"you> " not in seen and time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            seen += os.read(proc.stdout.fileno(), 4096)
    assert b"you> " in seen, seen
    proc.send_signal(signal.SIGINT)  # at the prompt, as a user's Ctrl-C
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err and err.strip().splitlines() == ["tunelab: interrupted (Ctrl-C)"]


def test_streamed_pieces_add_up_to_the_reply_without_the_end_marker(tokenizer):
    from tunelab.infer.generate import _TextStream

    pieces: list[str] = []
    s = _TextStream(tokenizer, ["<|im_end|>"], pieces.append)
    s.put(torch.tensor([0]))  # the prompt
    for tid in tokenizer("Hello there, how are you today?<|im_end|>\n")["input_ids"]:
        s.put(torch.tensor([tid]))
    s.finish("Hello there, how are you today?")
    assert len(pieces) > 3 and "".join(pieces) == "Hello there, how are you today?"


# --------------------------------------------------------------------------- audit: review marks, quickstart data

def test_apply_review_marks(tmp_path):
    rows = [{"instruction": f"Question {k}: what is {k} plus {k}?", "input": "", "output": f"It is {2 * k}."} for k in range(12)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    proc = cli("audit", "train.jsonl", "--no-tokenizer", "--sample", "4", "--quiet", cwd=tmp_path)
    page = tmp_path / "runs" / "audit-train" / "audit-spotcheck.html"
    assert proc.returncode == 0 and str(page.relative_to(tmp_path)) in proc.stdout, proc.stdout
    ids = re.findall(r'data-id="([^"]+)"', page.read_text())
    assert len(ids) == 4
    with open(tmp_path / "marks.csv", "w", newline="") as fh:  # what the page's "export marks" writes
        w = csv.writer(fh)
        w.writerow(["n", "record", "mark", "note"])
        for k, (rid, mark) in enumerate(zip(ids, ["ok", "drop", "fix", ""]), 1):
            w.writerow([k, rid, mark, f"note {k}"])
    proc = cli("audit", "train.jsonl", "--no-tokenizer", "--sample", "0", "--apply-review", "marks.csv", "--fix", "clean/train.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    kept = [json.loads(x) for x in (tmp_path / "clean" / "train.jsonl").read_text().splitlines()]
    to_fix = [json.loads(x) for x in (tmp_path / "clean" / "train.to-fix.jsonl").read_text().splitlines()]
    line_of = lambda rid: int(rid.rsplit(":", 1)[1])  # noqa: E731
    assert len(kept) == 10 and rows[line_of(ids[1]) - 1] not in kept and rows[line_of(ids[2]) - 1] not in kept
    assert to_fix == [rows[line_of(ids[2]) - 1]]
    assert "reviewer marked drop" in proc.stdout and "note 2" in proc.stdout and "1 drop, 1 fix, 1 ok" in proc.stdout
    # marks for records that are not in the data are an error naming the CSV line
    (tmp_path / "bad.csv").write_text("n,record,mark,note\n1,train.jsonl:999,drop,\n")
    line = one_error_line(cli("audit", "train.jsonl", "--no-tokenizer", "--sample", "0", "--apply-review", "bad.csv", "--fix", "o.jsonl", cwd=tmp_path))
    assert "bad.csv:2: record train.jsonl:999 is not among the audited train records" in line
    line = one_error_line(cli("audit", "train.jsonl", "--no-tokenizer", "--apply-review", "marks.csv", cwd=tmp_path))
    assert "--apply-review needs --fix OUT" in line


def test_quickstart_data_passes_its_own_audit(tmp_path):
    shutil.copy(REPO / "examples" / "quickstart.yaml", tmp_path / "quickstart.yaml")
    gen = subprocess.run([sys.executable, str(REPO / "examples" / "make_quickstart_data.py"), str(tmp_path / "data")],
                         capture_output=True, text=True, timeout=60)
    assert gen.returncode == 0, gen.stderr
    proc = cli("audit", "--config", "quickstart.yaml", "--sample", "0", "--json", "report.json", cwd=tmp_path)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert proc.returncode == 0 and rep["summary"]["errors"] == 0, (proc.stdout[-3000:], rep["summary"])
    assert rep["leakage"]["eval_records_leaked"] == 0 and rep["duplicates"]["exact_groups"] == 0
    train = {json.dumps(json.loads(x)) for x in (tmp_path / "data" / "train.jsonl").read_text().splitlines()}
    evals = [json.dumps(json.loads(x)) for x in (tmp_path / "data" / "eval.jsonl").read_text().splitlines()]
    assert len(train) == 320 and len(evals) == 77 and not train & set(evals)
