"""Helpers of the audit tests (imported by the test modules; fixtures live in conftest.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from tunelab.audit import AuditOptions, run_audit

REPO = Path(__file__).resolve().parents[2]
SHARED = (REPO / ".." / "shared" / "data").resolve()  # real public data; never copied into the repo

def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows: dicts (dumped as JSON) or raw strings / bytes (written as the line itself)."""
    with open(path, "wb") as fh:
        for r in rows:
            if isinstance(r, bytes):
                fh.write(r + b"\n")
            elif isinstance(r, str):
                fh.write(r.encode("utf-8", "surrogatepass") + b"\n")
            else:
                fh.write(json.dumps(r).encode() + b"\n")
    return path


def alpaca(instruction: str, output: str, input: str = "") -> dict:
    return {"instruction": instruction, "input": input, "output": output}


def audit(train: list, eval: list = (), renderer: Any = None, **opts: Any):
    o = AuditOptions(**{"sample": 0, **opts})
    return run_audit(train, list(eval), renderer=renderer, options=o)


def codes(report, severity: Optional[str] = None) -> set[str]:
    return report.codes(severity)


def cli_args(*argv: str) -> argparse.Namespace:
    from tunelab.audit.cli import add_audit_parser

    p = argparse.ArgumentParser(prog="tunelab")
    sub = p.add_subparsers(dest="command")
    add_audit_parser(sub)
    return p.parse_args(["audit", *argv])


# Words for synthetic English-like records (common words: realistic overlap between records).
VOCAB = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they you were "
    "her she there been one all we their has would when if so no will more out up into do any your what some can time "
    "only could new these two may first then other than now over such like our man me even most made after also did many "
    "before must through back years where much your way well down should because each just those people how too little "
    "state good very make world still own see men work long get here between both life being under never day same another "
    "know while last might us great old year off come since against go came right used take three states himself few house "
    "use during without again place american around however home small found thought went say part once general high upon "
    "school every don does got united left number course war until always away something fact though water less public put "
    "think almost hand enough far took head yet government system better set told nothing night end why called didn eyes "
    "find going look asked later knew point next program city business give group toward young days let room president side "
    "social given present several order national possible rather second face per among form important often things looked "
    "early white case john become large big need four within felt along children saw best church ever least power development "
    "light thing seemed family interest want members mind country area others done turned although open god service certain "
    "kind problem began different door thus help sense means whole matter perhaps itself york times law human line above name "
    "example action company hands local show whether five history gave today either act feet across taken past quite anything "
    "having seen death experience body word half really week field car words already themselves information tell together "
    "college shall money period held keep sure free seems real behind cannot miss political air question making office brought "
    "whose special heard major problems ago became federal moment study available known result street economic boy position "
    "reason change south board individual job areas society west close turn love community true court force full seem "
    "river garden planet engine metal paper music energy ocean forest bridge castle island mountain desert valley winter summer"
).split()
