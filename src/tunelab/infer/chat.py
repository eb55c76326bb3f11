"""``tunelab chat``: a REPL over :func:`generate` with line editing, history and streaming.

Commands: ``/help``, ``/reset`` (asks first), ``/system TEXT``, ``/exit``. An empty line does
nothing; Ctrl-D exits; Ctrl-C stops a reply being generated, and at the prompt quits (the CLI
turns it into one line, exit code 130).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional

from ..models.load import cache_root
from .generate import Loaded, generate

HELP = """commands:
  /help          this list
  /reset         forget the conversation (asks first)
  /system TEXT   set the system message (/system alone shows it; /system - removes it)
  /exit          quit (Ctrl-D too)
An empty line does nothing. Ctrl-C stops a reply; at the prompt it quits. Start a message
with // to send a line that begins with /."""


def _enable_line_editing() -> Optional[Path]:
    """readline editing and a persistent history when stdin is a terminal; the history file."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline: plain input()
        return None
    hist = cache_root() / "chat_history"
    try:
        readline.read_history_file(hist)
    except OSError:
        pass
    readline.set_history_length(1000)
    return hist


def _save_history(hist: Optional[Path]) -> None:
    if hist is None:
        return
    import readline

    try:
        hist.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(hist)
    except OSError:
        pass


class Chat:
    """The conversation and its commands; ``read`` and ``write`` are input() and stdout."""

    def __init__(self, loaded: Loaded, system: Optional[str], gen_kw: dict, read: Callable[[str], str] = input,
                 write: Callable[[str], Any] = None):
        self.loaded, self.system, self.gen_kw, self.read = loaded, system, gen_kw, read
        self.write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        self.turns: list[dict] = []

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def command(self, line: str) -> bool:
        """Run a /command; False to quit."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/exit", "/quit"):
            return False
        if cmd == "/help":
            self.write(HELP + "\n")
        elif cmd == "/reset":
            n = len(self.turns) // 2
            if not self.turns:
                self.write("nothing to reset\n")
            elif self.read(f"forget the conversation ({n} exchange{'s' if n != 1 else ''})? [y/N] ").strip().lower() in ("y", "yes"):
                self.turns = []
                self.write("conversation cleared" + (" (the system message stays)" if self.system else "") + "\n")
            else:
                self.write("kept\n")
        elif cmd == "/system":
            if not arg:
                self.write(f"system: {self.system}\n" if self.system else "no system message\n")
            elif arg == "-":
                self.system = None
                self.write("system message removed\n")
            else:
                self.system = arg
                self.write("system message set\n")
        else:
            self.write(f"unknown command {cmd}; /help lists the commands\n")
        return True

    def reply(self, text: str) -> None:
        self.turns.append({"role": "user", "content": text})
        self.write("assistant> ")
        try:
            out = generate(self.loaded, [self.messages()], on_text=self.write, **self.gen_kw)[0]
        except KeyboardInterrupt:
            self.turns.pop()
            self.write("\n[reply stopped]\n")
            return
        self.write("\n")
        self.turns.append({"role": "assistant", "content": out})

    def loop(self) -> None:
        self.write("tunelab chat: /help for commands, Ctrl-D to quit\n")
        while True:
            try:
                line = self.read("you> ")
            except EOFError:
                self.write("\n")
                return
            line = line.strip()
            if not line:
                continue
            if line.startswith("/") and not line.startswith("//"):
                if not self.command(line):
                    return
                continue
            self.reply(line[1:] if line.startswith("//") else line)


def run_chat(loaded: Loaded, system: Optional[str], max_new_tokens: int, temperature: float, top_p: float) -> None:
    hist = _enable_line_editing()
    try:
        Chat(loaded, system, dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)).loop()
    finally:
        _save_history(hist)
