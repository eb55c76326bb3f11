"""Column mapping: rename a dataset's columns to the keys of a supported format, and suggest a
mapping for records whose keys match no format.

``columns: {prompt: question, completion: answer}`` reads column ``question`` as ``prompt`` and
``answer`` as ``completion`` (then the record is detected as ``flan``); ``{messages: dialog}``
reads a list of ``{role, content}`` from ``dialog``; ``{instruction: q, input: ctx, output: a}``
gives ``alpaca``. The mapping is applied to every record before format detection, for files and
Hugging Face datasets alike.
"""

from __future__ import annotations

from typing import Any, Optional

# Column names people use for the prompt / the answer / a whole conversation, most common first.
PROMPT_NAMES = ("question", "query", "prompt", "instruction", "input", "problem", "q", "source", "user", "human", "context", "request")
ANSWER_NAMES = ("answer", "response", "output", "completion", "target", "solution", "a", "reply", "assistant", "label", "chosen")


def apply_columns(data: Any, columns: Optional[dict[str, str]]) -> tuple[Any, Optional[str]]:
    """``data`` with mapped columns renamed; (data, problem) where problem says what is missing."""
    if not columns or not isinstance(data, dict):
        return data, None
    out = dict(data)
    for key, col in columns.items():
        if col not in data:
            return data, f"columns maps {key!r} to column {col!r}, which the record lacks (keys seen: {sorted(data)})"
        if key != col:
            out.pop(col, None)
        out[key] = data[col]
    return out, None


def _is_chat(v: Any) -> Optional[str]:
    """'messages' or 'conversations' when ``v`` looks like a list of turns."""
    if isinstance(v, list) and v and isinstance(v[0], dict):
        if "role" in v[0]:
            return "messages"
        if "from" in v[0]:
            return "conversations"
    return None


def suggest_columns(data: Any) -> Optional[str]:
    """A ``columns:`` mapping that would make ``data`` a supported record, as YAML, or None."""
    if not isinstance(data, dict) or not data:
        return None
    for k, v in data.items():
        kind = _is_chat(v)
        if kind:
            return f"columns: {{{kind}: {k}}}"
    lower = {str(k).lower(): k for k in data}
    strings = [k for k, v in data.items() if isinstance(v, str)]
    prompt = next((lower[n] for n in PROMPT_NAMES if n in lower), None)
    answer = next((lower[n] for n in ANSWER_NAMES if n in lower and lower[n] != prompt), None)
    if prompt is None or answer is None:
        if len(strings) >= 2:  # no telling names: the first two text columns, in order
            prompt, answer = (prompt, next(k for k in strings if k != prompt)) if prompt else (strings[0], answer or strings[1])
        else:
            return None
    ctx = next((lower[n] for n in ("context", "input", "passage", "document") if n in lower and lower[n] not in (prompt, answer)), None)
    if ctx is not None:
        return f"columns: {{instruction: {prompt}, input: {ctx}, output: {answer}}}"
    return f"columns: {{prompt: {prompt}, completion: {answer}}}"
