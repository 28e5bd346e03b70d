"""Does an engine with kt's kernels compute what the stock engine computes?

A probe is a few greedy completions with the top-k log-probabilities of every step, taken from a
running server (`probe`). Two probes agree (`compare`) when, for every prompt:

* the greedy tokens are the same at every step (a token whose text servers render differently,
  `ambiguous`, is the same when its logprob is); or
* they are the same up to a step where the stock engine's top two choices were a near-tie
  (log-probabilities within `tol`), so float reordering may legitimately flip the choice; and
* at every step up to the first difference, the log-probabilities of the top-k tokens both
  engines list differ by at most `tol` (the per-step logits agree, up to the softmax shift),
  among the tokens within `LOGPROB_WINDOW` nats of the step's top one: a token e^-20 times
  less likely than the choice plays no part in greedy or sampled output, and kt's random models
  put the runners-up hundreds of nats down, where one bf16 ulp of a logit is several nats.

A planted broken kernel (one that skips the normalization) must fail this comparison: that shows
the kernel is in the served path.

Every engine, stock MAX included, is also compared with an fp32 reference computed with Hugging
Face transformers from the same model folder (`hf_reference.py`): it tells which of two
disagreeing engines is wrong. An engine that served only texts is compared with the reference's
top-k steps (`compare_text_to_steps`), so a near-tie flip is still told from a wrong kernel.
"""

from __future__ import annotations

import json
import random
import urllib.request
from dataclasses import dataclass, field

DEFAULT_TOL = 1e-2  # nats; kt.rms_norm in fp32 moves logprobs by ~1e-5 on the tiny model
# 16-bit weights: the engines round logits to bf16/fp16 before the softmax, and kt's random
# models have logits of std ~30-45 (max ~150): one bf16 ulp there is 1 nat, so two correct
# engines differ by that much in every logprob but the (near-zero) top one.
HALF_TOL = 1.0


# Logprobs compared only for tokens at most this far (nats) below the step's top token. On the
# H200 (2026-12-03) the 1B random model's probes put the runner-up 400 nats down; MAX with kt's
# kernels and the fp32 reference chose the same tokens everywhere and differed by 3.6 nats there.
LOGPROB_WINDOW = 20.0


def default_tol(dtype: str | None) -> float:
    """The logprob tolerance (nats) for a model computed in `dtype`."""
    return HALF_TOL if dtype in ("bfloat16", "float16") else DEFAULT_TOL


PROBE_TOKENS, PROBE_TOP_K = 16, 5  # greedy steps per prompt, logprobs per step
# Words (one token each, after the tokenizer's BOS) per probe prompt: under a page of 128 tokens,
# exactly one, one past it, and several. Not shorter: on the H200, MAX 26.7 serves prompts of up
# to ~25-64 tokens a wrong first token, with or without kt (its last layer's hidden state at the
# prompt's last row is not the model's), and from 65 tokens on both engines give the fp32
# reference's tokens (benchmarks/results/serving_h200/agreement_2026-12-04b/); a probe that
# fails on stock MAX alone cannot check kt's kernels. `--probe-lengths 1,5,24` asks for them.
PROBE_LENGTHS = (100, 127, 128, 300)


def fitting_lengths(max_model_len: int, lengths: tuple[int, ...] = PROBE_LENGTHS) -> tuple[int, ...]:
    """The default probe lengths that fit a context of `max_model_len` with BOS and PROBE_TOKENS
    generated tokens (the longest that fits when none does)."""
    room = max(1, max_model_len - PROBE_TOKENS - 1)
    return tuple(n for n in lengths if n <= room) or (room,)


def probe_prompts(words: list[str], lengths: tuple[int, ...] = PROBE_LENGTHS, seed: int = 1234) -> list[str]:
    """One prompt of random stable words per entry of `lengths`; prompt i depends only on the
    lengths up to i (so `--probe-lengths 100,127,128,300,1` keeps the default's four prompts)."""
    rng = random.Random(seed)
    return ["".join(rng.choice(words) for _ in range(length)) for length in lengths]


def _complete(base_url: str, body: dict, timeout_s: float) -> dict:
    req = urllib.request.Request(base_url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())["choices"][0]


def probe(base_url: str, model: str, prompts: list[str], max_tokens: int = PROBE_TOKENS, top_k: int = PROBE_TOP_K,
          extra: dict | None = None, timeout_s: float = 300.0) -> list[list[dict[str, float]]]:
    """For each prompt, the greedy steps as {token: logprob} of the top-k (chosen token first)."""
    out = []
    for prompt in prompts:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "logprobs": top_k, **(extra or {})}
        choice = _complete(base_url, body, timeout_s)
        steps = []
        for top in choice["logprobs"]["top_logprobs"]:
            steps.append(dict(sorted(top.items(), key=lambda kv: -kv[1])))
        out.append(steps)
    return out


def probe_texts(base_url: str, model: str, prompts: list[str], max_tokens: int = PROBE_TOKENS,
                extra: dict | None = None, timeout_s: float = 300.0) -> list[str]:
    """For each prompt, the greedy completion's text: the probe for servers that serve no
    logprobs (MAX's overlap scheduler, on by default on GPUs, rejects requests asking for them)."""
    return [_complete(base_url, {"model": model, "prompt": p, "max_tokens": max_tokens, "temperature": 0.0,
                                 **(extra or {})}, timeout_s)["text"] for p in prompts]


LOGPROBS = "greedy tokens and top-k logprobs"


@dataclass
class Agreement:
    prompts: int = 0
    identical: int = 0  # prompts whose greedy tokens all match
    near_tie_flips: int = 0  # prompts that diverge at a near-tie
    mismatches: list[str] = field(default_factory=list)  # prompts that diverge without a tie
    max_logprob_diff: float = 0.0  # over the steps before any divergence
    steps_compared: int = 0
    tol: float | None = DEFAULT_TOL  # None: texts compared, no logprobs
    mode: str = LOGPROBS

    @property
    def ok(self) -> bool:
        return not self.mismatches and (self.tol is None or self.max_logprob_diff <= self.tol)

    def summary(self) -> str:
        verdict = "AGREE" if self.ok else "DISAGREE"
        if self.mode != LOGPROBS:
            flips = f", {self.near_tie_flips} near-tie flips (tol {self.tol:g})" if self.tol is not None else ""
            return (f"{verdict} ({self.mode}): {self.identical}/{self.prompts} greedy completions identical"
                    f"{flips}, {len(self.mismatches)} mismatches")
        return (f"{verdict}: {self.identical}/{self.prompts} prompts token-identical, "
                f"{self.near_tie_flips} near-tie flips, {len(self.mismatches)} mismatches; "
                f"max |dlogprob| {self.max_logprob_diff:.2e} over {self.steps_compared} steps (tol {self.tol:g})")


def ambiguous(token: str) -> bool:
    """A token text that servers render differently: empty (a special token MAX skips, vLLM
    writes out; a byte vLLM holds back) or with U+FFFD (a byte of a partial UTF-8 character, as
    MAX decodes it alone). Such texts are not matched by text: the token is the same when its
    logprob is."""
    return not token or "\ufffd" in token


def same_token(s: dict[str, float], o: dict[str, float], tol: float) -> bool:
    """Are two steps' first tokens one token rendered differently? One text is ambiguous, the
    other is not listed by the other step under its own text, and their logprobs agree."""
    s_tok, o_tok = next(iter(s)), next(iter(o))
    return ((ambiguous(s_tok) or ambiguous(o_tok)) and (ambiguous(o_tok) or o_tok not in s)
            and (ambiguous(s_tok) or s_tok not in o) and abs(s[s_tok] - o[o_tok]) <= tol)


def compare(stock: list[list[dict[str, float]]], other: list[list[dict[str, float]]],
            tol: float = DEFAULT_TOL) -> Agreement:
    a = Agreement(prompts=len(stock), tol=tol)
    for i, (s_steps, o_steps) in enumerate(zip(stock, other)):
        diverged = False
        for step, (s, o) in enumerate(zip(s_steps, o_steps)):
            top = next(iter(s.values()))
            common = {t for t in set(s) & set(o) if not ambiguous(t) and top - s[t] <= LOGPROB_WINDOW}
            if common:
                a.max_logprob_diff = max(a.max_logprob_diff, max(abs(s[t] - o[t]) for t in common))
            a.steps_compared += 1
            s_tok, o_tok = next(iter(s)), next(iter(o))
            if s_tok != o_tok and not same_token(s, o, tol):
                diverged = True
                if o_tok in s and s[s_tok] - s[o_tok] <= tol:
                    a.near_tie_flips += 1
                else:
                    a.mismatches.append(f"prompt {i} step {step}: {s_tok!r} vs {o_tok!r}")
                break
        if not diverged and len(s_steps) == len(o_steps):
            a.identical += 1
        elif not diverged:
            a.mismatches.append(f"prompt {i}: {len(s_steps)} vs {len(o_steps)} steps")
    return a


def compare_texts(stock: list[str], other: list[str]) -> Agreement:
    """Greedy completions compared as text (byte-level BPE decodes each token sequence to one
    text): identical, or a mismatch at the first differing character. Without logprobs a near-tie
    cannot be told from a wrong kernel, so any difference is a mismatch."""
    a = Agreement(prompts=len(stock), mode="greedy text (no logprobs served)", tol=None)
    for i, (s, o) in enumerate(zip(stock, other)):
        a.steps_compared += 1
        if s == o:
            a.identical += 1
        else:
            at = next((k for k, (x, y) in enumerate(zip(s, o)) if x != y), min(len(s), len(o)))
            a.mismatches.append(f"prompt {i}: texts differ at character {at}: {s[at:at + 20]!r} vs {o[at:at + 20]!r}")
    return a


def compare_text_to_steps(steps: list[list[dict[str, float]]], texts: list[str], tol: float = DEFAULT_TOL,
                          stock_texts: list[str] | None = None,
                          greedy: list[list[tuple[str, float]]] | None = None) -> Agreement:
    """Greedy texts of an engine that served no logprobs against a probe that has top-k steps
    (the fp32 reference). A text identical to the stock text is identical; else it is walked
    along the stock's greedy tokens (`greedy`: each step's [text, logprob]; else each step's
    first key). Where it leaves them, it must go on with the text of another of that step's
    top-k tokens whose logprob is within `tol` of the greedy one's (a near-tie flip; the
    sequences legitimately part there), else it is a mismatch. A token of a partial UTF-8
    character (text '\ufffd') may decode otherwise inside a whole text: a text that leaves the
    walk there is a mismatch too (conservative)."""
    a = Agreement(prompts=len(steps), tol=tol, mode="greedy text against the top-k steps")
    for i, (s_steps, text) in enumerate(zip(steps, texts)):
        if stock_texts is not None and text == stock_texts[i]:
            a.identical += 1
            a.steps_compared += len(s_steps)
            continue
        pos = 0
        for step, top in enumerate(s_steps):
            a.steps_compared += 1
            chosen, best = greedy[i][step] if greedy else next(iter(top.items()))
            if text.startswith(chosen, pos):
                pos += len(chosen)
                continue
            if any(t and t != chosen and best - lp <= tol and text.startswith(t, pos) for t, lp in top.items()):
                a.near_tie_flips += 1
            else:
                a.mismatches.append(f"prompt {i} step {step}: {chosen!r} vs {text[pos:pos + 20]!r}")
            break
        else:
            if pos == len(text):
                a.identical += 1
            else:
                a.mismatches.append(f"prompt {i}: text goes on after {len(s_steps)} steps: {text[pos:pos + 20]!r}")
    return a


def compare_probes(stock: dict, other: dict, tol: float = DEFAULT_TOL) -> Agreement:
    """Two probe records (`probe.json`): their top-k logprob steps where both servers served them;
    the other's greedy texts against the stock's steps where only the stock has steps; else
    their greedy texts."""
    if "steps" in stock and "steps" in other:
        return compare(stock["steps"], other["steps"], tol=tol)
    if "steps" in stock:
        return compare_text_to_steps(stock["steps"], other["texts"], tol, stock.get("texts"), stock.get("greedy"))
    return compare_texts(stock["texts"], other["texts"])
