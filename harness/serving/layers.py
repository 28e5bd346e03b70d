"""Where a served prefill departs from the fp32 reference, layer by layer.

    python -m harness.serving.layers SERVER.log REFERENCE_PROBE.json [--tol 0.05]

SERVER.log is a MAX Serve log of kt's architecture under KT_CHECK=hidden (e.g.
`--engines max+kt:none --engine-env max+kt:none=KT_CHECK=hidden`), whose decoder layers print
[layer, rows, max |h|, RMS, ...] of each sequence's last row of the residual stream after their
attention ("kt hidden attn") and after their MLP ("kt hidden"); REFERENCE_PROBE.json is the same
run's reference probe (`reference/probe.json`), whose `hidden_attn[p][l]` and `hidden[p][l]`
hold the fp32 model's same statistics at prompt p's last token. The probe prompts are served one
at a time, each prefill a batch of one sequence of `prompt_tokens[p]` rows, in the order of the
probe: prompt p's prefill is the next run of two prints per layer, in layer order, whose row
count is its token count. For each prompt: the first step (layer L's attention or MLP) whose
served RMS is off the reference's by more than --tol (relative), and the table of every layer.
Exit status 0; 2 on bad input (one line).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

LINE = re.compile(r"^kt hidden(?P<attn> attn)? \[.*?\] = tensor\(\[\[(?P<values>[^\]]*)\]\]")


@dataclass
class Print:
    after: str  # "attention" or "mlp": where in the layer the residual stream was printed
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
        out.append(Print("attention" if m["attn"] else "mlp", int(v[0]), int(v[1]),
                         [(v[i], v[i + 1]) for i in range(2, len(v), 2)]))
    return out


def prefills(prints: list[Print], tokens: list[int], layers: int) -> list[list[Print] | None]:
    """For each probe prompt, in order, the prints of its prefill: the first run of 2 x `layers`
    consecutive single-sequence prints with its row count (layer 0 after attention, after the
    MLP, layer 1 ...), after the previous prompt's (None when the log has none)."""
    want = [(k, after) for k in range(layers) for after in ("attention", "mlp")]
    found, at = [], 0
    for n in tokens:
        group = None
        for i in range(at, len(prints) - len(want) + 1):
            run = prints[i:i + len(want)]
            if all(p.rows == n and len(p.stats) == 1 and (p.layer, p.after) == w for p, w in zip(run, want)):
                group, at = run, i + len(want)
                break
        found.append(group)
    return found


def compare(prints: list[Print], ref: dict, tol: float) -> list[dict]:
    """Per prompt: {prompt, tokens, first_off: (layer, "attention" | "mlp") or None, rows: [(layer,
    ref RMS after attention, served, ref RMS after the MLP, served, ref max |h| after the MLP,
    served)]}, or {prompt, tokens, missing: True}."""
    hidden, attn, tokens = ref["hidden"], ref["hidden_attn"], ref["prompt_tokens"]
    layers = len(hidden[0])
    out = []
    for p, group in enumerate(prefills(prints, tokens, layers)):
        if group is None:
            out.append({"prompt": p, "tokens": tokens[p], "missing": True})
            continue
        rows, off = [], None
        for k in range(layers):
            sa, so = group[2 * k].stats[0], group[2 * k + 1].stats[0]
            rows.append((k, attn[p][k][1], sa[1], hidden[p][k][1], so[1], hidden[p][k][0], so[0]))
            for after, ref_rms, served in (("attention", attn[p][k][1], sa[1]), ("mlp", hidden[p][k][1], so[1])):
                if off is None and abs(served - ref_rms) > tol * ref_rms:
                    off = (k, after)
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
        if not (ref.get("hidden") and ref.get("hidden_attn") and ref.get("prompt_tokens")):
            raise ValueError(f"{a.reference} has no per-layer statistics (hidden, hidden_attn, prompt_tokens): "
                             "a reference from before KT_CHECK=hidden")
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
        print(f"{head} " + ("every layer within tol" if off is None else f"first off at layer {off[0]}'s {off[1]}"))
        print("  layer  RMS after attention (ref, served)  RMS after MLP (ref, served)  max |h| (ref, served)")
        for k, ra, sa, ro, so, rm, sm in r["rows"]:
            print(f"  {k:5d}  {ra:16.4f} {sa:12.4f}      {ro:12.4f} {so:12.4f}   {rm:10.4f} {sm:10.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
