"""Workloads: lists of requests with fixed seeds, the same for every engine.

* `random`: completions whose prompt is exactly `input_len` tokens of the model's tokenizer
  (the server adds its BOS on top) and whose output is exactly `output_len` tokens (EOS ignored).
  Prompts are built from "stable" tokens, each one a space-led word that re-encodes to itself;
  byte-level BPE splits text at spaces before merging, so a run of N such words is N tokens.
* `sonnet`: completions over kt's own sonnets (`data/sonnets.txt`), as vLLM's sonnet set: a
  fixed instruction, then random lines until `input_len` tokens.
* `chat`: kt's short conversational set (`data/conversations.jsonl`) on /v1/chat/completions.

A dataset can also be a path to a JSONL file whose rows are {"prompt": str} or
{"messages": [...]}, optionally with "output_len".
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from .model import DATA


class DatasetError(ValueError):
    """A dataset could not be read or does not fit the model."""


@dataclass(frozen=True)
class Request:
    endpoint: str  # "completions" or "chat"
    output_len: int
    prompt: str | None = None
    messages: tuple | None = None
    prompt_len: int | None = None  # in the model's tokens, without BOS; None when unknown


def load_tokenizer(model: Path):
    from tokenizers import Tokenizer

    path = Path(model) / "tokenizer.json"
    if not path.exists():
        raise DatasetError(f"{path} not found: the random and sonnet workloads need the model's tokenizer")
    return Tokenizer.from_file(str(path))


def count_tokens(tok, text: str) -> int:
    return len(tok.encode(text, add_special_tokens=False).ids)


def stable_words(tok) -> list[str]:
    words = []
    for token, tid in tok.get_vocab().items():
        if not token.startswith("Ġ") or not token[1:].isalpha() or not token[1:].isascii():
            continue
        text = " " + token[1:]
        if tok.encode(text, add_special_tokens=False).ids == [tid]:
            words.append(text)
    return sorted(words)


def random_requests(model: Path, n: int, input_len: int, output_len: int, seed: int) -> list[Request]:
    tok = load_tokenizer(model)
    words = stable_words(tok)
    if len(words) < 16:
        raise DatasetError(f"tokenizer of {model} has too few single-token words for the random workload")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = "".join(rng.choice(words) for _ in range(input_len))
        got = count_tokens(tok, prompt)
        if got != input_len:
            raise DatasetError(f"random prompt encodes to {got} tokens, wanted {input_len}")
        out.append(Request("completions", output_len, prompt=prompt, prompt_len=input_len))
    return out


SONNET_PREFIX = "Pick as many lines as you can from these poem lines and continue them:\n"


def sonnet_requests(model: Path, n: int, input_len: int, output_len: int, seed: int) -> list[Request]:
    tok = load_tokenizer(model)
    lines = [ln.strip() + "\n" for ln in (DATA / "sonnets.txt").read_text().splitlines() if ln.strip()]
    base = count_tokens(tok, SONNET_PREFIX)
    if input_len <= base:
        raise DatasetError(f"sonnet input_len must exceed the {base}-token instruction")
    # Byte-level BPE never merges across a newline, so a prompt's length is the sum of its lines'
    # lengths: each line is encoded once (checked on every prompt built).
    sizes = [count_tokens(tok, ln) for ln in lines]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts, total = [SONNET_PREFIX], base
        while True:
            i = rng.randrange(len(lines))
            if total + sizes[i] > input_len:
                break
            parts.append(lines[i])
            total += sizes[i]
        prompt = "".join(parts)
        if count_tokens(tok, prompt) != total:
            raise DatasetError(f"sonnet prompt encodes to {count_tokens(tok, prompt)} tokens, not the {total} "
                               "its lines add up to")
        out.append(Request("completions", output_len, prompt=prompt, prompt_len=total))
    return out


def jsonl_requests(path: Path, n: int, output_len: int, seed: int, tok=None) -> list[Request]:
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read dataset {path}: {e}") from e
    rows = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DatasetError(f"malformed dataset {path}: line {i}: {e.msg}") from None
    reqs = []
    for i, row in rows:
        if not isinstance(row, dict):
            raise DatasetError(f"malformed dataset {path}: line {i} is not an object")
        olen = row.get("output_len", output_len)
        if isinstance(olen, bool) or not isinstance(olen, int) or olen < 1:
            raise DatasetError(f"malformed dataset {path}: line {i}: output_len {olen!r} is not a positive integer")
        if isinstance(row.get("prompt"), str):
            plen = count_tokens(tok, row["prompt"]) if tok else None
            reqs.append(Request("completions", olen, prompt=row["prompt"], prompt_len=plen))
        elif isinstance(row.get("messages"), list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in row["messages"]
        ):
            msgs = tuple((m["role"], m["content"]) for m in row["messages"])
            reqs.append(Request("chat", olen, messages=msgs))
        else:
            raise DatasetError(
                f"malformed dataset {path}: line {i} needs a string 'prompt' or a 'messages' list of "
                "{role, content}"
            )
    if not reqs:
        raise DatasetError(f"dataset {path} is empty")
    rng = random.Random(seed)
    rng.shuffle(reqs)
    return [reqs[i % len(reqs)] for i in range(n)]


def build(dataset: str, model: Path, n: int, input_len: int, output_len: int, seed: int) -> list[Request]:
    """`n` requests of `dataset` (random, sonnet, chat, or a JSONL path)."""
    if n < 1:
        raise DatasetError("--num-prompts must be at least 1")
    if output_len < 1 or input_len < 1:
        raise DatasetError("--input-len and --output-len must be at least 1")
    if dataset == "random":
        return random_requests(model, n, input_len, output_len, seed)
    if dataset == "sonnet":
        return sonnet_requests(model, n, input_len, output_len, seed)
    if dataset == "chat":
        return jsonl_requests(DATA / "conversations.jsonl", n, output_len, seed)
    path = Path(dataset)
    if not path.exists():
        raise DatasetError(f"dataset {dataset!r} is neither random, sonnet, chat nor an existing file")
    tok = load_tokenizer(model) if (Path(model) / "tokenizer.json").exists() else None
    return jsonl_requests(path, n, output_len, seed, tok)


def workload_hash(requests: list[Request]) -> str:
    """sha256 of the requests, to tell whether two result files measured the same workload."""
    h = hashlib.sha256()
    for r in requests:
        h.update(json.dumps(asdict(r), sort_keys=True).encode())
    return h.hexdigest()[:16]
