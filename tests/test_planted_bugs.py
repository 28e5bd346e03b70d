"""Bugs kernel authors make, planted one at a time into a copy of kt's Mojo package and
handed to `kt verify --kernels`: each must be caught, with a minimal case and a replay line.

Each plant is a small source edit of the shipped CPU path (what runs here); an edit whose
target text has gone stale fails loudly instead of silently testing nothing.
"""

import shutil
from dataclasses import dataclass

import pytest

from harness.build import KERNELS

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Plant:
    name: str
    kernel: str
    file: str
    old: str
    new: str
    dtype: str = "float32"


PLANTS = [
    Plant("rope_interleaved_pairs", "rope", "rope.mojo",
          "base + i + half]", "base + 2 * i + 1]"),
    Plant("rope_rotates_backwards", "rope", "rope.mojo",
          "return (x1 * c - x2 * s, x2 * c + x1 * s)", "return (x1 * c + x2 * s, x2 * c - x1 * s)"),
    Plant("attention_causal_off_by_one", "fused_rope_attention", "fused_rope_attention.mojo",
          "var n_keys = q_pos + 1 if causal != 0 else skv", "var n_keys = q_pos if causal != 0 else skv"),
    Plant("attention_missing_scale", "fused_rope_attention", "fused_rope_attention.mojo",
          "var s = dot * sm_scale", "var s = dot"),
    Plant("attention_softmax_overflow", "fused_rope_attention", "fused_rope_attention.mojo",
          "var p = exp(scores[unsafe_offset=j] - m)", "var p = exp(scores[unsafe_offset=j])"),
    Plant("attention_wrong_gqa_head", "fused_rope_attention", "fused_rope_attention.mojo",
          "                var kvh = h // (hq // hk)", "                var kvh = h % hk"),
    Plant("attention_q_rotated_at_index_not_position", "fused_rope_attention",
          "fused_rope_attention.mojo",
          "_rotated_row(q_rot, qp.unsafe_offset(r * head_dim), head_dim, q_pos, freqs)",
          "_rotated_row(q_rot, qp.unsafe_offset(r * head_dim), head_dim, i, freqs)"),
    Plant("rms_norm_eps_outside_sqrt", "rms_norm", "rms_norm.mojo",
          "var r = rsqrt(_sum_squares[dtype](x, n) / Float32(n) + eps)",
          "var r = rsqrt(_sum_squares[dtype](x, n) / Float32(n)) + eps"),
    Plant("rms_norm_forgets_weight", "rms_norm", "rms_norm.mojo",
          "y[unsafe_offset=j] = (v * r * w[unsafe_offset=j].cast[DType.float32]()).cast[dtype]()",
          "y[unsafe_offset=j] = (v * r).cast[dtype]()"),
]


def plant(tmp_path, p: Plant):
    pkg = tmp_path / f"planted_{p.name}"
    shutil.copytree(KERNELS, pkg)
    src = (pkg / p.file).read_text()
    assert p.old in src, f"plant {p.name} is stale: {p.old!r} is not in kernels/{p.file}"
    (pkg / p.file).write_text(src.replace(p.old, p.new))
    return pkg


@pytest.mark.parametrize("p", PLANTS, ids=[p.name for p in PLANTS])
def test_planted_bug_is_caught(kt, tmp_path, p):
    pkg = plant(tmp_path, p)
    r = kt("verify", p.kernel, "--device", "cpu", "--dtype", p.dtype, "--kernels", str(pkg),
           "--profile", "ci", "--no-triton", json_out=True)
    assert r.code == 1, r.output
    (result,) = r.json["results"]
    assert result["status"] == "ok"
    failure = result["failure"]
    assert failure is not None and "mojo" in failure["what"]
    assert "minimal failing case" in r.stdout
    assert f"kt verify {p.kernel} --device cpu --replay" in r.stdout


def test_replay_reproduces_the_failure(kt, tmp_path):
    p = next(p for p in PLANTS if p.name == "attention_wrong_gqa_head")
    pkg = plant(tmp_path, p)
    first = kt("verify", p.kernel, "--device", "cpu", "--dtype", "float32", "--kernels", str(pkg),
               "--profile", "ci", "--no-triton", json_out=True)
    case = first.json["results"][0]["failure"]["case"]
    from harness.verify import case_json

    again = kt("verify", p.kernel, "--device", "cpu", "--kernels", str(pkg), "--replay",
               case_json(case), "--no-triton", json_out=True)
    assert again.code == 1
    assert again.json["results"][0]["failure"]["case"] == case


def test_kernel_writing_into_its_input_is_caught(kt, tmp_path):
    p = Plant("rms_norm_clobbers_x", "rms_norm", "rms_norm.mojo",
              "y[unsafe_offset=j] = (v * r * w[unsafe_offset=j].cast[DType.float32]()).cast[dtype]()",
              "y[unsafe_offset=j] = (v * r * w[unsafe_offset=j].cast[DType.float32]()).cast[dtype]()\n"
              "        x[unsafe_offset=j] = 0")
    r = kt("verify", "rms_norm", "--device", "cpu", "--dtype", "float32", "--kernels",
           str(plant(tmp_path, p)), "--profile", "ci", "--no-triton", json_out=True)
    assert r.code == 1
    assert r.json["results"][0]["failure"]["mutated"] == ["x"]
    assert "wrote into its inputs: x" in r.stdout


def test_crashing_kernel_is_reported_not_fatal(kt, tmp_path):
    p = Plant("rms_norm_aborts", "rms_norm", "rms_norm.mojo",
              "    var r = rsqrt(_sum_squares[dtype](x, n) / Float32(n) + eps)",
              "    abort(\"planted crash\")\n    var r = rsqrt(_sum_squares[dtype](x, n) / Float32(n) + eps)")
    pkg = plant(tmp_path, p)
    src = (pkg / p.file).read_text()
    (pkg / p.file).write_text(src.replace("import extensibility\n", "import extensibility\nfrom std.os import abort\n", 1))
    r = kt("verify", "rms_norm", "--device", "cpu", "--dtype", "float32", "--kernels",
           str(pkg), "--profile", "ci", "--no-triton", json_out=True)
    assert r.code == 1
    (result,) = r.json["results"]
    assert result["status"] == "crash" and result["last_case"]["dtype"] == "float32"
    assert "the kernel process died" in r.stdout and "Traceback" not in r.output
