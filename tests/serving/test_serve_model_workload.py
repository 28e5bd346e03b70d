"""kt make-model and the workloads: determinism, vocabulary coverage, exact lengths, bad data."""

import hashlib
import json

import pytest
from click.testing import CliRunner

from harness.serving import workload
from harness.serving.cli import make_model
from harness.serving.model import PRESETS


def digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_make_model_is_deterministic_and_complete(tmp_path, tiny_model):
    res = CliRunner().invoke(make_model, ["tiny", str(tmp_path / "again"), "--seed", "0"])
    assert res.exit_code == 0, res.output
    assert digest(tmp_path / "again") == digest(tiny_model)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tiny_model / name).exists()
    assert "chat_template" in json.loads((tiny_model / "tokenizer_config.json").read_text())
    other = CliRunner().invoke(make_model, ["tiny", str(tmp_path / "seed1"), "--seed", "1"])
    assert other.exit_code == 0
    assert digest(tmp_path / "seed1")["model.safetensors"] != digest(tiny_model)["model.safetensors"]


def test_tokenizer_covers_the_whole_vocabulary(tiny_model):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_model / "tokenizer.json"))
    cfg = json.loads((tiny_model / "config.json").read_text())
    assert tok.get_vocab_size() == cfg["vocab_size"] == PRESETS["tiny"].vocab_size
    assert sorted(tok.get_vocab().values()) == list(range(cfg["vocab_size"]))
    for i in range(5, cfg["vocab_size"]):  # every non-special id decodes to text
        assert tok.decode([i]) != ""


@pytest.mark.parametrize("input_len", [1, 17, 128])
def test_random_prompts_have_exact_token_lengths(tiny_model, input_len):
    tok = workload.load_tokenizer(tiny_model)
    reqs = workload.build("random", tiny_model, 5, input_len, 7, seed=3)
    assert [workload.count_tokens(tok, r.prompt) for r in reqs] == [input_len] * 5
    assert all(r.output_len == 7 for r in reqs)
    assert workload.workload_hash(reqs) == workload.workload_hash(workload.build("random", tiny_model, 5, input_len, 7, seed=3))
    assert workload.workload_hash(reqs) != workload.workload_hash(workload.build("random", tiny_model, 5, input_len, 7, seed=4))


def test_sonnet_and_chat_sets(tiny_model):
    tok = workload.load_tokenizer(tiny_model)
    son = workload.build("sonnet", tiny_model, 4, 120, 8, seed=0)
    assert all(r.prompt.startswith(workload.SONNET_PREFIX) for r in son)
    assert all(workload.count_tokens(tok, r.prompt) <= 120 for r in son)
    chat = workload.build("chat", tiny_model, 20, 1, 8, seed=0)
    assert len(chat) == 20 and all(r.endpoint == "chat" and r.messages for r in chat)


@pytest.mark.parametrize("text, msg", [
    ("{not json\n", "malformed dataset"),
    ('{"nothing": 1}\n', "needs a string 'prompt'"),
    ('[1, 2]\n', "is not an object"),
    ("", "is empty"),
])
def test_malformed_dataset(tmp_path, tiny_model, text, msg):
    p = tmp_path / "d.jsonl"
    p.write_text(text)
    with pytest.raises(workload.DatasetError, match=msg):
        workload.build(str(p), tiny_model, 3, 8, 8, seed=0)
