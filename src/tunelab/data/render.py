"""Templates, rendering with character offsets, labels from offsets, and the parity check.

One function, :meth:`Renderer.render`, serves training *and* inference, so template parity
is a property of one function rather than of two that must agree (docs/practices.md#template-parity: "training
format must exactly match inference-time format including special tokens").

How labels are derived (never by tokenizing pieces separately and hoping they concatenate):

1. For each assistant turn i, render ``messages[:i]`` with the generation cue (exactly the
   prompt inference will see) and ``messages[:i+1]``. The difference is the turn's text; the
   full rendering must start with both, else the template is not prefix-stable and we fail.
2. The trained character range of a turn runs from the end of its prompt to the end of its
   end-of-turn marker (``<|im_end|>``, ``<|eot_id|>``, eos...), so the model learns to stop;
   whitespace the template adds *after* the marker is never generated and is not trained.
3. The full text is tokenized once with offsets; a token is trained iff its character span
   overlaps a trained range. Padding is masked by position later, never by token id, so
   pad == eos cannot mask the eos (the classic "model never stops" bug).
4. Parity: the tokens of each trained turn's inference prompt must equal the prefix of the
   training tokens. A template that breaks this raises :class:`TemplateParityError`.
"""

from __future__ import annotations

import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..config import DataConfig, TrainOn
from .formats import Conversation

IGNORE = -100
TRAIN_ON_CHOICES: tuple[str, ...] = typing.get_args(TrainOn)

# Built-in templates, as Jinja chat templates so that they run through the very same
# ``apply_chat_template`` path as a tokenizer's own template.
BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama3": (
        "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ 'ipython' if m['role'] == 'tool' else m['role'] }}"
        "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    # Llama-2 chat: the system prompt lives inside the first [INST]; each answer ends in eos.
    "llama2": (
        "{% set ns = namespace(sys='') %}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.sys = '<<SYS>>\n' + m['content'] + '\n<</SYS>>\n\n' %}"
        "{% elif m['role'] == 'assistant' %} {{ m['content'] }} {{ eos_token }}"
        "{% else %}<s>[INST] {{ ns.sys }}{{ 'Tool result: ' if m['role'] == 'tool' else '' }}{{ m['content'] }} [/INST]{% set ns.sys = '' %}"
        "{% endif %}{% endfor %}"
    ),
    "mistral": (
        "{% set ns = namespace(sys='', first=true) %}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{% set ns.sys = m['content'] + '\n\n' %}"
        "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
        "{% else %}{% if ns.first %}<s>{% set ns.first = false %}{% endif %}[INST] {{ ns.sys }}"
        "{{ 'Tool result: ' if m['role'] == 'tool' else '' }}{{ m['content'] }}[/INST]{% set ns.sys = '' %}"
        "{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
        "{% elif m['role'] == 'tool' %}### Observation:\n{{ m['content'] }}\n\n"
        "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}### Response:\n{% endif %}"
    ),
    "plain": (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}\n"
        "{% else %}{{ m['content'] }}\n{% endif %}{% endfor %}"
    ),
}

# End-of-turn markers, most specific first. Each built-in template names its own.
TEMPLATE_EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
KNOWN_EOT_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|end_of_text|>")


class TemplateError(ValueError):
    """The template cannot be used (missing, or not prefix-stable)."""


class TemplateParityError(TemplateError):
    """The inference prompt's tokens differ from the training tokens' prefix."""


def custom_template(template: str) -> tuple[str, str]:
    """(Jinja source, display name) of a custom template: a file (.jinja, .jinja2, .j2, or any
    existing file) or an inline Jinja chat template string."""
    if "{{" in template or "{%" in template:
        return template, "inline template"
    from pathlib import Path

    p = Path(template).expanduser()
    if p.suffix.lower() in (".jinja", ".jinja2", ".j2") or p.is_file():
        if not p.is_file():
            raise TemplateError(f"template: {p} not found")
        return p.read_text(encoding="utf-8"), f"template file {p}"
    raise TemplateError(f"unknown template {template!r}; use auto, one of {', '.join(BUILTIN_TEMPLATES)}, a .jinja file or an inline Jinja template")


def template_source(template: str, tokenizer: Any = None) -> Optional[str]:
    """The Jinja source a ``template`` setting stands for (None for auto: the tokenizer's own)."""
    if template == "auto":
        return getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    return BUILTIN_TEMPLATES[template] if template in BUILTIN_TEMPLATES else custom_template(template)[0]


# A conversation with every role and two assistant turns: what a custom template must render
# prefix-stably and token-for-token like its inference prompts before any data is read.
PROBE_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "6."},
]


def check_template(renderer: "Renderer") -> None:
    """Run the parity checks of training (prefix stability, inference tokens == training
    prefix) on :data:`PROBE_CONVERSATION`; raise TemplateError with the reason if they fail."""
    import jinja2

    conv = Conversation(messages=[dict(m) for m in PROBE_CONVERSATION], source="the probe conversation")
    try:
        exs, _ = renderer.encode_many([conv], None, "drop")
    except TemplateError as e:
        raise TemplateParityError(f"refused: {e}") from None
    except jinja2.TemplateError as e:
        raise TemplateError(f"template {renderer.template_name!r} does not render: {type(e).__name__}: {e}") from None
    if not exs:
        raise TemplateError(f"refused: template {renderer.template_name!r} leaves no trained tokens in a conversation with two assistant turns")


@dataclass
class RenderedText:
    """A conversation rendered to text, with the character ranges that carry loss."""

    text: str
    trained: list[tuple[int, int]]  # [start, end) character ranges, sorted, non-overlapping
    prompts: list[str]  # the inference prompt before each assistant turn
    cuts: list[int] = field(default_factory=list)  # tokenization boundaries: cue ends and turn ends


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE where not trained
    task: Optional[str] = None
    source: str = ""
    truncated: bool = False

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodeStats:
    """What happened to over-long or untrainable examples (reported, never silent)."""

    total: int = 0
    kept: int = 0
    dropped_too_long: int = 0  # truncation=drop
    prompt_truncated: int = 0  # truncation=truncate_prompt, completion intact
    completion_truncated: int = 0  # kept, but lost some completion tokens
    dropped_no_completion: int = 0  # would lose every completion token: never trained
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> sources
    lengths: list[int] = field(default_factory=list)  # full token length of every trainable example, before any cut

    def note(self, reason: str, source: str) -> None:
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(source)

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.total} examples kept"]
        for k in ("dropped_too_long", "prompt_truncated", "completion_truncated", "dropped_no_completion"):
            v = getattr(self, k)
            if v:
                parts.append(f"{k.replace('_', ' ')}: {v}")
        return "; ".join(parts)


def chunk_spans(text: str, cuts: Sequence[int]) -> list[tuple[int, int]]:
    """The [start, end) character spans ``text`` is tokenized in: cut at every point of ``cuts``
    inside the text (the ends of generation cues and of turns), empty spans dropped.

    Training/inference parity rests on this one function: the training text, each inference
    prompt (:meth:`Renderer.prompt_ids`) and the audit's fast token counts (``audit/tokens.py``)
    are all tokenized span by span, so BPE merges never cross a point where inference hands
    over to the model."""
    bounds = [0] + [c for c in cuts if 0 < c < len(text)] + [len(text)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


class Renderer:
    """Renders conversations for a tokenizer and template, for training and inference.

    ``train_on`` (``data.train_on``) says which tokens carry loss; it belongs to the renderer
    because the trained character ranges are a property of the rendering, like the template.
    """

    def __init__(self, tokenizer: Any, template: str = "auto", train_on: TrainOn = DataConfig.train_on):
        if train_on not in TRAIN_ON_CHOICES:
            raise ValueError(f"train_on: {train_on!r} is not one of {list(TRAIN_ON_CHOICES)}")
        self.tokenizer = tokenizer
        self.train_on: TrainOn = train_on
        self.template_name = template
        if template == "auto":
            if not getattr(tokenizer, "chat_template", None):
                raise TemplateError(
                    "template: auto, but the tokenizer has no chat template; set template: to one of "
                    f"{', '.join(BUILTIN_TEMPLATES)}"
                )
            self.chat_template = tokenizer.chat_template
            self.template_name = "the tokenizer's chat template"
        elif template in BUILTIN_TEMPLATES:
            self.chat_template = BUILTIN_TEMPLATES[template]
        else:
            self.chat_template, self.template_name = custom_template(template)
        self.eot_markers = self._eot_markers(template)
        if template != "auto" and template not in BUILTIN_TEMPLATES:
            check_template(self)  # a custom template is refused up front when it breaks parity

    @classmethod
    def from_config(cls, tokenizer: Any, cfg: Any) -> "Renderer":
        """The renderer a run's config asks for: ``cfg.template`` and ``cfg.data.train_on``."""
        return cls(tokenizer, cfg.template, cfg.data.train_on)

    # -- the template ------------------------------------------------------------------
    def _eot_markers(self, template: str) -> tuple[str, ...]:
        if template in TEMPLATE_EOT:
            return (TEMPLATE_EOT[template],)
        eos = getattr(self.tokenizer, "eos_token", None)
        markers = [m for m in KNOWN_EOT_MARKERS if m != eos]
        return tuple(([eos] if eos else []) + markers)

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The template applied to ``messages``: the one rendering used everywhere."""
        if not messages and not add_generation_prompt:
            return ""
        import jinja2

        try:  # transformers renders in jinja2's ImmutableSandboxedEnvironment: no Python internals
            return self.tokenizer.apply_chat_template(
                list(messages), chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"{self.template_name} tried something the sandbox forbids ({e}); it was not run. "
                                f"Use a built-in template (template: chatml|llama3|...) or a template you trust") from None


    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end an assistant turn at generation time."""
        ids = []
        eos_id = getattr(self.tokenizer, "eos_token_id", None)
        if eos_id is not None:
            ids.append(eos_id)
        for m in self.eot_markers:
            tid = self.tokenizer.convert_tokens_to_ids(m)
            unk = getattr(self.tokenizer, "unk_token_id", None)
            if isinstance(tid, int) and tid != unk and tid not in ids and m in self.tokenizer.get_vocab():
                ids.append(tid)
        return ids

    # -- rendering with offsets ------------------------------------------------------------
    def turn_boundaries(self, msgs: Sequence[dict], source: str = "") -> tuple[str, list[tuple[int, str, int, int]]]:
        """Full text and, per assistant turn i: (i, its inference prompt, start, end-of-turn end)."""
        full = self.render(msgs)
        turns = []
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self.render(msgs[:i], add_generation_prompt=True)
            upto = self.render(msgs[: i + 1])
            if not upto.startswith(prompt) or not full.startswith(upto):
                raise TemplateParityError(
                    f"template {self.template_name!r} is not prefix-stable at message {i} of {source or 'a conversation'}: "
                    "the inference prompt is not a prefix of the training text, so training and inference formats "
                    "would differ. Use a built-in template (template: chatml|llama3|...) or fix the chat template."
                )
            turns.append((i, prompt, len(prompt), self._end_of_turn(upto, len(prompt), len(upto))))
        return full, turns

    def render_with_offsets(self, conv: Conversation) -> RenderedText:
        if conv.is_text:
            # Raw text (replay): every token trained, closed by eos so documents end.
            text = conv.text + (self.tokenizer.eos_token or "")
            return RenderedText(text, [(0, len(text))], [], [])
        full, turns = self.turn_boundaries(conv.messages, conv.source)
        chosen = turns[-1:] if self.train_on == "last_assistant" else turns
        trained = [(0, len(full))] if self.train_on == "all" else [(a, b) for _, _, a, b in chosen]
        cuts = sorted({c for _, _, a, b in turns for c in (a, b)})
        return RenderedText(full, trained, [p for _, p, _, _ in turns], cuts)

    def _end_of_turn(self, text: str, start: int, end: int) -> int:
        """End of the trained range: just after the turn's end-of-turn marker."""
        seg = text[start:end]
        best = -1
        for m in self.eot_markers:
            k = seg.rfind(m)
            if k >= 0:
                best = max(best, k + len(m))
        if best < 0:
            if not getattr(self, "_warned_no_eot", False):
                warnings.warn(
                    f"template {self.template_name!r} closes assistant turns with no end-of-turn token: the model "
                    "cannot learn to stop. Use a template that appends eos.",
                    stacklevel=3,
                )
                self._warned_no_eot = True
            return start + len(seg.rstrip())
        return start + best

    # -- tokens -----------------------------------------------------------------------------
    # Text is tokenized in chunks cut at the end of every generation cue (the points where
    # inference hands over to the model). BPE merges never cross those points, so the
    # training tokens of each prompt are exactly the tokens inference feeds the model: e.g.
    # with a GPT-2-style tokenizer "\n\n" + "Hello" tokenizes as [\n, \n, Hello] in one
    # piece but the prompt alone ends in the single token "\n\n". Labels still come from
    # character offsets of the full rendering.
    def _tokenize_chunked(self, texts: list[str], cuts: list[list[int]]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        pieces: list[str] = []
        spans: list[tuple[int, int, int]] = []  # (example, piece start index, piece char offset)
        for k, (text, cut) in enumerate(zip(texts, cuts)):
            for a, b in chunk_spans(text, cut):
                spans.append((k, len(pieces), a))
                pieces.append(text[a:b])
        enc = self.tokenizer(pieces, add_special_tokens=False, return_offsets_mapping=True) if pieces else {"input_ids": [], "offset_mapping": []}
        ids: list[list[int]] = [[] for _ in texts]
        offs: list[list[tuple[int, int]]] = [[] for _ in texts]
        for k, j, base in spans:
            ids[k].extend(enc["input_ids"][j])
            offs[k].extend((s + base, e + base) for s, e in enc["offset_mapping"][j])
        return ids, offs

    def encode_many(
        self,
        convs: Sequence[Conversation],
        max_seq_len: Optional[int] = None,
        truncation: str = "drop",
        check_parity: bool = True,
    ) -> tuple[list[EncodedExample], EncodeStats]:
        """Render and tokenize conversations into (input_ids, labels); report what was dropped."""
        rendered = [self.render_with_offsets(c) for c in convs]
        all_ids, all_offs = self._tokenize_chunked([r.text for r in rendered], [r.cuts for r in rendered])
        if check_parity:
            self._check_parity(rendered, all_ids)
        stats = EncodeStats(total=len(convs))
        out: list[EncodedExample] = []
        for conv, r, ids, offs in zip(convs, rendered, all_ids, all_offs):
            labels = _labels_from_offsets(ids, offs, r.trained)
            ex = EncodedExample(list(ids), labels, conv.task, conv.source)
            if sum(1 for x in labels if x != IGNORE) == 0:
                stats.dropped_no_completion += 1
                stats.note("no trained tokens", conv.source)
                continue
            stats.lengths.append(len(ids))
            if max_seq_len is not None and len(ids) > max_seq_len:
                ex = self._fit(ex, max_seq_len, truncation, stats)
                if ex is None:
                    continue
            out.append(ex)
        stats.kept = len(out)
        return out, stats

    def _fit(self, ex: EncodedExample, max_len: int, truncation: str, stats: EncodeStats) -> Optional[EncodedExample]:
        if truncation == "drop":
            stats.dropped_too_long += 1
            stats.note("longer than max_seq_len", ex.source)
            return None
        # truncate_prompt: cut the oldest context from the left, keep the completion whole.
        # The completion is everything from the first trained token of the last trained turn.
        trained_pos = [i for i, x in enumerate(ex.labels) if x != IGNORE]
        last_start = _last_run_start(ex.labels)
        cut = len(ex.input_ids) - max_len
        if cut <= last_start:
            ids, labels = ex.input_ids[cut:], ex.labels[cut:]
            kept_trained = sum(1 for x in labels if x != IGNORE)
            if kept_trained == len(trained_pos):
                stats.prompt_truncated += 1
            else:
                stats.completion_truncated += 1  # earlier turns lost, last completion intact
            return EncodedExample(ids, labels, ex.task, ex.source, truncated=True)
        # Even with no prompt left the completion does not fit: it would lose its tokens.
        ids = ex.input_ids[last_start - 1 : last_start - 1 + max_len] if last_start > 0 else ex.input_ids[:max_len]
        labels = ex.labels[last_start - 1 : last_start - 1 + max_len] if last_start > 0 else ex.labels[:max_len]
        if not any(x != IGNORE for x in labels) or last_start == 0:
            stats.dropped_no_completion += 1
            stats.note("completion would lose all tokens", ex.source)
            return None
        stats.completion_truncated += 1
        stats.note("completion cut", ex.source)
        return EncodedExample(ids, labels, ex.task, ex.source, truncated=True)

    def _check_parity(self, rendered: list[RenderedText], train_ids: list[list[int]], limit: int = 64) -> None:
        """Inference prompt tokens (via :meth:`prompt_ids`' path) == prefix of the training tokens."""
        flat = [(k, p) for k, r in enumerate(rendered[:limit]) for p in r.prompts]
        if not flat:
            return
        prompt_ids, _ = self._tokenize_chunked([p for _, p in flat], [[c for c in rendered[k].cuts if c <= len(p)] for k, p in flat])
        for (k, prompt), pids in zip(flat, prompt_ids):
            if train_ids[k][: len(pids)] != pids:
                first = next((j for j, (a, b) in enumerate(zip(train_ids[k], pids)) if a != b), min(len(pids), len(train_ids[k])))
                raise TemplateParityError(
                    f"template {self.template_name!r}: the inference prompt tokenizes differently from the training "
                    f"text (first difference at token {first}: {pids[first:first + 3]} vs {train_ids[k][first:first + 3]}). "
                    "The model would see a different format at inference."
                )

    # -- inference ----------------------------------------------------------------------
    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of the inference prompt: the training rendering up to the generation cue,
        tokenized with the same boundaries as training (so parity holds by construction)."""
        messages = list(messages)
        text = self.render(messages, add_generation_prompt=True)
        _, turns = self.turn_boundaries(messages)
        cuts = sorted({c for _, _, a, b in turns for c in (a, b)} | {len(text)})
        return self._tokenize_chunked([text], [cuts])[0][0]

    def segments(self, conv: Conversation, max_seq_len: Optional[int] = None, truncation: str = "drop") -> dict:
        """The example as text segments with a trained flag, decoded from the actual tokens.

        With ``max_seq_len`` the example is fitted as training fits it: ``status`` is ``kept``,
        ``truncated`` (the segments are what trains) or ``dropped`` (the segments show the whole
        record, none of which trains); ``n_tokens_full`` is the length before any cut."""
        full, _ = self.encode_many([conv], None, "drop")
        if not full:
            return {"segments": [], "n_tokens": 0, "n_trained": 0, "n_tokens_full": 0, "status": "dropped"}
        ex, status = full[0], "kept"
        if max_seq_len is not None and len(ex) > max_seq_len:
            fitted = self._fit(ex, max_seq_len, truncation, EncodeStats())
            ex, status = (fitted, "truncated") if fitted is not None else (ex, "dropped")
        segs: list[dict] = []
        run: list[int] = []
        flag = None
        for tid, lab in zip(ex.input_ids, ex.labels):
            t = lab != IGNORE and status != "dropped"
            if flag is not None and t != flag:
                segs.append({"text": self.tokenizer.decode(run), "trained": flag})
                run = []
            run.append(tid)
            flag = t
        if run:
            segs.append({"text": self.tokenizer.decode(run), "trained": bool(flag)})
        return {"segments": segs, "n_tokens": len(ex.input_ids) if status != "dropped" else 0,
                "n_trained": ex.n_trained if status != "dropped" else 0, "n_tokens_full": len(full[0]), "status": status}


def _labels_from_offsets(ids: Sequence[int], offsets: Sequence[tuple[int, int]], trained: list[tuple[int, int]]) -> list[int]:
    """labels[j] = ids[j] if token j's characters overlap a trained range, else IGNORE."""
    labels = [IGNORE] * len(ids)
    r = 0
    for j, (s, e) in enumerate(offsets):
        while r < len(trained) and trained[r][1] <= s:
            r += 1
        if r == len(trained):
            break
        a, b = trained[r]
        if e > a and s < b:
            labels[j] = ids[j]
    return labels


def _last_run_start(labels: list[int]) -> int:
    """Index of the first token of the last contiguous trained run."""
    j = len(labels) - 1
    while j >= 0 and labels[j] == IGNORE:
        j -= 1
    while j > 0 and labels[j - 1] != IGNORE:
        j -= 1
    return max(j, 0)
