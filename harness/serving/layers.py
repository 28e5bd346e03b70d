"""Where a served prefill departs from the fp32 reference, layer by layer.

    python -m harness.serving.layers SERVER.log REFERENCE_PROBE.json [--tol 0.05]

SERVER.log is a MAX Serve log of kt's architecture under KT_CHECK=hidden (e.g.
`--engines max+kt:none --engine-env max+kt:none=KT_CHECK=hidden`), whose decoder layers print
[layer, rows, max |h|, RMS, ...] of each sequence's last row; REFERENCE_PROBE.json is the same
run's reference probe (`reference/probe.json`), whose `hidden[p][l]` holds the fp32 model's
[max |h|, RMS] at prompt p's last token after layer l. The probe prompts are served one at a
time, each prefill a batch of one sequence of `prompt_tokens[p]` rows, in the order of the
probe: prompt p's prefill is the next group of one print per layer whose row count is its
token count. For each prompt: the first layer whose served RMS is off the reference's by more
than --tol (relative), and the table of every layer. Exit status 0; 2 on bad input (one line).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

LINE = re.compile(r"^kt hidden \[.*?\] = tensor\(\[\[(?P<values>[^\]]*)\]\]")


@dataclass
class Print:
    layer: int
    rows: int
    stats: list[tuple[float, float]]  # per sequence: (max |h|, RMS) of its last row


def parse_log(text: str) -> list[Print]:
    """Every KT_CHECK=hidden print of the log, in order."""
    out = []
    for line in text.splitlines():
        m = LINE.match(line.strip())
        if not m:
            continue
        v = [float(x) for x in m["values"].split(",") if x.strip()]
        if len(v) < 4 or len(v) % 2:
            continue
        out.append(Print(int(v[0]), int(v[1]), [(v[i], v[i + 1]) for i in range(2, len(v), 2)]))
    return out


def prefills(prints: list[Print], tokens: list[int], layers: int) -> list[list[Print] | None]:
    """For each probe prompt, in order, the prints of its prefill: the first run of `layers`
    consecutive single-sequence prints, layers 0.. in order, with its row count, after the
    previous prompt's (None when the log has none)."""
    found, at = [], 0
    for n in tokens:
        group = None
        for i in range(at, len(prints) - layers + 1):
            run = prints[i:i + layers]
            if all(p.rows == n and len(p.stats) == 1 and p.layer == k for k, p in enumerate(run)):
                group, at = run, i + layers
                break
        found.append(group)
    return found


def compare(prints: list[Print], ref: dict, tol: float) -> list[dict]:
    """Per prompt: {prompt, tokens, first_off (layer or None), rows: [(layer, ref max, ref RMS,
    served max, served RMS)]} or {prompt, tokens, missing: True}."""
    hidden, tokens = ref["hidden"], ref["prompt_tokens"]
    layers = len(hidden[0])
    out = []
    for p, group in enumerate(prefills(prints, tokens, layers)):
        if group is None:
            out.append({"prompt": p, "tokens": tokens[p], "missing": True})
            continue
        rows = [(k, *hidden[p][k], *g.stats[0]) for k, g in enumerate(group)]
        off = next((k for k, rmax, rrms, smax, srms in rows if abs(srms - rrms) > tol * rrms), None)
        out.append({"prompt": p, "tokens": tokens[p], "first_off": off, "rows": rows})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.serving.layers", description=__doc__.split("\n\n")[0])
    ap.add_argument("log", type=Path)
    ap.add_argument("reference", type=Path)
    ap.add_argument("--tol", type=float, default=0.05, help="relative RMS difference that counts as off")
    a = ap.parse_args(argv)
    try:
        text = a.log.read_text(errors="replace")
        ref = json.loads(a.reference.read_text())
        if not (ref.get("hidden") and ref.get("prompt_tokens")):
            raise ValueError("no per-layer statistics (hidden, prompt_tokens): a reference from before KT_CHECK=hidden")
    except (OSError, ValueError) as e:
        print(f"layers: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 2
    prints = parse_log(text)
    if not prints:
        print(f"layers: {a.log} has no 'kt hidden' lines (serve with KT_CHECK=hidden)", file=sys.stderr)
        return 2
    for r in compare(prints, ref, a.tol):
        head = f"prompt {r['prompt']} ({r['tokens']} tokens):"
        if r.get("missing"):
            print(f"{head} no prefill of that many rows in the log")
            continue
        off = r["first_off"]
        print(f"{head} " + ("every layer within tol" if off is None else f"first off at layer {off}"))
        print("  layer   ref max   ref rms   served max  served rms  rms ratio")
        for k, rmax, rrms, smax, srms in r["rows"]:
            print(f"  {k:5d} {rmax:9.4f} {rrms:9.4f} {smax:12.4f} {srms:11.4f} {srms / rrms:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
