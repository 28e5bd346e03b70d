"""MAX custom architecture: stock MAX Llama 3 whose RMSNorm layers call kt's `kt.rms_norm` and
whose attention layers call kt's `kt.paged_rope_store` + `kt.paged_rope_attention`.

Loaded by `max serve --custom-architectures <this dir>:kt_max_llama`, which imports it inside
MAX's own environment (no kt import here) and registers `ARCHITECTURES` over the built-in
`LlamaForCausalLM`. Everything else (weights, projections, MLP, KV cache manager, sampler) is
MAX's.

Attention, in every decoder layer: MAX's QKV projection, then kt.paged_rope_store (the new
keys rotated as they are written, with the values, into MAX's paged KV cache, in place) and
kt.paged_rope_attention (the unrotated queries rotated as the kernel loads them, causal GQA
attention over the cache through MAX's block table), then MAX's output projection. kt's ops
take the raw tensors MAX's paged collection is built of (the blocks buffer, cache lengths,
lookup table; the attention also its host-side maximum prompt and cache lengths, which size
its GPU launches) and the RoPE parameters of the model's config: they are called from this
architecture rather than registered over MAX's kernel names, because MAX's named kernels
(`mo.rope_split_store.ragged.paged`, `mo.mha.ragged.paged`) receive rotated queries and a
precomputed cos/sin table, not the unrotated queries and frequency parameters a fused kernel
needs.

The Mojo package comes from $KT_CUSTOM_KERNEL_PATH and is attached to the decoder graph through
`GraphSpec.custom_extensions`, MAX's mechanism for graphs that call custom ops.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from max.dtype import DType
from max.graph import DeviceRef, TensorType, TensorValue, ops
from max.nn.attention import AttentionWithRope
from max.nn.attention.attention_with_rope import flash_attention_ragged, rope_split_store_ragged
from max.nn.norm import RMSNorm
from max.nn.transformer import TransformerBlock
from max.pipelines.architectures.llama3.arch import llama_arch
from max.pipelines.architectures.llama3.model import Llama3Model

KERNELS = Path(os.environ["KT_CUSTOM_KERNEL_PATH"])
OP = os.environ.get("KT_RMS_NORM_OP", "kt.rms_norm")
STORE_OP = "kt.paged_rope_store"
ATTENTION_OP = "kt.paged_rope_attention"
# Which of kt's ops go into the graph (kt serve-bench's max+kt:OP+OP): all by default; "none"
# (max+kt:none) keeps MAX's own layers, for the KT_CHECK modes on stock MAX's graph.
KT_OPS = {o for o in os.environ.get("KT_OPS", "rms_norm,attention").split(",") if o and o != "none"}
if not KT_OPS <= {"rms_norm", "attention"}:
    raise ValueError(f"KT_OPS={os.environ['KT_OPS']!r}: kt's ops here are rms_norm and attention")
# KT_CHECK=1: every kt op also runs MAX's own layer on the same input, and the graph prints, per
# call, the largest |kt| and |kt - MAX| ("kt check ..." lines in the model worker's log). The
# served output stays kt's. Prints run where the graph runs eagerly (prefill; captured device
# graphs may skip them: serve with --no-device-graph-capture to see decode steps too).
# Two parts of what KT_CHECK=1 adds, apart, to tell which of them changes the served output:
# KT_CHECK=store: MAX's RoPE + KV store writes each layer's keys and values into the cache
# before kt's store does (no prints, no MAX attention); KT_CHECK=sync: no MAX ops, but each
# attention layer, kt's or MAX's, ends by copying its row offsets and cache lengths to the
# host and printing them (the host waits for the GPU at every layer, as KT_CHECK=1's prints do).
# KT_CHECK=hidden: each decoder layer prints the residual stream's last row per sequence after
# its attention and after its MLP (max |h| and the RMS, in fp32), with the layer and the batch's
# row count, to set beside the fp32 reference's (hf_reference.py's "hidden", "hidden_attn"): the
# first that departs names where a served prefill goes wrong.
CHECK_MODE = {"": None, "0": None, "1": "full", "full": "full", "store": "store",
              "sync": "sync", "hidden": "hidden"}.get(os.environ.get("KT_CHECK", ""), "invalid")
if CHECK_MODE == "invalid":
    raise ValueError(f"KT_CHECK={os.environ['KT_CHECK']!r}: use 1 (full), store, sync or hidden")
CHECK = CHECK_MODE == "full"


def _check(label: str, kt: TensorValue, ref: TensorValue) -> None:
    """Print max |kt| and max |kt - ref| over the whole tensor, in fp32."""
    a = ops.cast(kt, DType.float32)
    diff = ops.max(ops.reshape(ops.abs(a - ops.cast(ref, DType.float32)), [-1]), axis=0)
    size = ops.max(ops.reshape(ops.abs(a), [-1]), axis=0)
    ops.print(ops.concat([size, diff], axis=0).to(DeviceRef.CPU()), label=f"kt check {label} [max|kt|, max|kt-max|]")


class KtRMSNorm(RMSNorm):
    """RMSNorm through kt's op: y = x / sqrt(mean(x^2) + eps) * w, over the last axis."""

    def __call__(self, x: TensorValue) -> TensorValue:
        if self.weight_offset != 0.0:
            raise ValueError("kt.rms_norm has no weight offset (Gemma-style norms are not Llama's)")
        w = self.weight.cast(x.dtype)
        if x.device:
            w = w.to(x.device)
        shape = x.shape
        x2 = x if x.rank == 2 else ops.reshape(x, [-1, shape[-1]])
        eps = ops.constant(self.eps, DType.float32, device=DeviceRef.CPU())
        y = ops.custom(
            OP,
            device=x.device,
            values=[x2, w, eps],
            out_types=[TensorType(x.dtype, x2.shape, x.device)],
        )[0].tensor
        y = y if x.rank == 2 else ops.reshape(y, shape)
        if CHECK:
            _check("rms_norm", y, RMSNorm.__call__(self, x))
        return y


def _scalar(value, dtype=DType.float32) -> TensorValue:
    return ops.constant(value, dtype, device=DeviceRef.CPU())


def _max_lengths(kv_collection) -> list[TensorValue]:
    """MAX's maximum prompt and cache lengths of the batch (uint32 [1] tensors on the host:
    the most new tokens of a sequence, the longest sequence after the step) as the int32
    scalars kt.paged_rope_attention takes."""
    return [ops.cast(ops.reshape(x, []), DType.int32)
            for x in (kv_collection.max_prompt_length, kv_collection.max_cache_length)]


class KtAttentionWithRope(AttentionWithRope):
    """MAX's Llama attention with RoPE, the KV store and attention done by kt's paged ops."""

    def rope_args(self) -> list[TensorValue]:
        """theta and Llama 3's scaling (factor 1 = none), as kt's ops take them."""
        rope = self.rope
        if getattr(rope, "interleaved", False):
            raise ValueError("kt's paged ops use the half-rotation RoPE layout, not interleaved")
        scaling = getattr(rope, "scaling_params", None)
        factor, low, high, orig = ((scaling.factor, scaling.low_freq_factor,
                                    scaling.high_freq_factor, scaling.orig_max_position)
                                   if scaling is not None else (1.0, 1.0, 4.0, 8192.0))
        return [_scalar(float(x)) for x in (rope.theta, factor, low, high, orig)]

    def __call__(self, layer_idx, x, kv_collection, freqs_cis, input_row_offsets):
        if self.use_qk_norm or self.sliding_window is not None:
            raise ValueError("kt's paged attention has no QK norm or sliding window")
        head_dim = self.kv_params.head_dim
        n_kv = self.num_key_value_heads
        qkv = self.qkv_proj(x)
        xq, xk, xv = ops.split(qkv, [self.n_heads * head_dim, n_kv * head_dim,
                                     n_kv * head_dim], axis=-1)
        xq = xq.reshape((-1, self.n_heads, head_dim))
        xk = xk.reshape((-1, n_kv, head_dim))
        xv = xv.reshape((-1, n_kv, head_dim))
        layer = ops.cast(layer_idx, DType.int32)
        index = [kv_collection.cache_lengths, kv_collection.lookup_table, input_row_offsets]
        rope = self.rope_args()
        blocks = kv_collection.kv_blocks
        lengths = _max_lengths(kv_collection)

        def attend() -> TensorValue:  # kt's attention over the cache as it stands
            return ops.inplace_custom(
                ATTENTION_OP, device=x.device,
                values=[xq, blocks, *index, layer, *lengths, _scalar(float(self.scale)), *rope],
                out_types=[TensorType(xq.dtype, xq.shape, x.device)])[0].tensor

        if CHECK:
            # MAX's own layer first: it writes this step's keys and values (rotated by MAX), and
            # kt's attention kernel reads that cache once, before kt's store overwrites it, so
            # the kernel and the store are checked apart.
            ref, ref_attn = self._max_attention(qkv, layer_idx, kv_collection, freqs_cis,
                                                input_row_offsets)
            kernel_only = attend()
        elif CHECK_MODE == "store":
            self._max_store(qkv, layer_idx, kv_collection, freqs_cis, input_row_offsets)
        ops.inplace_custom(STORE_OP, device=x.device, values=[xk, xv, blocks, *index, layer, *rope],
                           out_types=[])
        attn = attend()
        out = self.o_proj(ops.reshape(attn, [x.shape[0], self.q_weight_dim]))
        if CHECK:
            ops.print(ops.cast(layer_idx, DType.int32), label="kt check attention layer")
            # kt addresses pages as packed; MAX passes the real page-to-page distance beside the
            # (packed) view: -1 when packed.
            ops.print(kv_collection.page_stride, label="kt check page_stride")
            ops.print(kv_collection.cache_lengths.to(DeviceRef.CPU()), label="kt check cache_lengths")
            ops.print(input_row_offsets.to(DeviceRef.CPU()), label="kt check row_offsets")
            ops.print(kv_collection.max_prompt_length, label="kt check max_prompt_length")
            ops.print(kv_collection.max_cache_length, label="kt check max_cache_length")
            _check("attention kernel on MAX's cache", kernel_only, ref_attn)
            _check("attention store+kernel", attn, ref_attn)
            _check("attention", out, ref)
        elif CHECK_MODE == "sync":
            _sync_print(layer_idx, kv_collection, input_row_offsets)
        return out

    def _max_store(self, qkv, layer_idx, kv_collection, freqs_cis, input_row_offsets):
        """MAX's RoPE + store of this step's keys and values (its rotated queries unused)."""
        return rope_split_store_ragged(
            kv_params=self.kv_params, qkv=qkv, input_row_offsets=input_row_offsets,
            freqs_cis=ops.cast(freqs_cis, qkv.dtype).to(qkv.device), kv_collection=kv_collection,
            layer_idx=layer_idx, n_heads=self.n_heads, interleaved=self.rope.interleaved,
            fuse=self._fuse_rope_and_store)

    def _max_attention(self, qkv, layer_idx, kv_collection, freqs_cis, input_row_offsets):
        """MAX's attention layer as `AttentionWithRope.__call__` builds it after the QKV
        projection (RoPE + store into the cache, flash attention over it, output projection):
        (the layer's output, the attention before the projection)."""
        xq = self._max_store(qkv, layer_idx, kv_collection, freqs_cis, input_row_offsets)
        xq = xq.reshape((-1, self.n_heads, self.kv_params.head_dim))
        attn = flash_attention_ragged(
            self.kv_params, input=xq, kv_collection=kv_collection, layer_idx=layer_idx,
            input_row_offsets=input_row_offsets, mask_variant=self.mask_variant,
            scale=self.scale, local_window_size=-1)
        return self.o_proj(ops.reshape(attn, [qkv.shape[0], self.q_weight_dim])), attn


def _sync_print(layer_idx, kv_collection, input_row_offsets) -> None:
    """KT_CHECK=sync: the layer's row offsets and cache lengths copied to the host and printed."""
    ops.print(ops.cast(layer_idx, DType.int32), label="kt sync attention layer")
    ops.print(kv_collection.cache_lengths.to(DeviceRef.CPU()), label="kt sync cache_lengths")
    ops.print(input_row_offsets.to(DeviceRef.CPU()), label="kt sync row_offsets")


class SyncedAttentionWithRope(AttentionWithRope):
    """KT_CHECK=sync on MAX's own attention layer (max+kt variants without kt's attention)."""

    def __call__(self, layer_idx, x, kv_collection, freqs_cis, input_row_offsets, *args, **kwargs):
        out = super().__call__(layer_idx, x, kv_collection, freqs_cis, input_row_offsets, *args, **kwargs)
        _sync_print(layer_idx, kv_collection, input_row_offsets)
        return out


class HiddenPrintingBlock(TransformerBlock):
    """KT_CHECK=hidden: MAX's decoder layer (`TransformerBlock.__call__`'s steps, as MAX 26.7
    writes them) with `_hidden_print` of the residual stream after attention and after the MLP."""

    def __call__(self, layer_idx, x, kv_collection, freqs_cis, input_row_offsets):
        def scaled(v: TensorValue) -> TensorValue:  # a branch's output times residual_multiplier
            m = self.residual_multiplier
            return v * ops.constant(m, v.dtype, device=v.device) if m != 1.0 else v

        attn = self.self_attn(layer_idx, self.input_layernorm(x), kv_collection, freqs_cis=freqs_cis,
                              input_row_offsets=input_row_offsets)
        h = x + scaled(attn)
        _hidden_print(layer_idx, h, input_row_offsets, "kt hidden attn")
        out = h + scaled(self.mlp(self.post_attention_layernorm(h)))
        _hidden_print(layer_idx, out, input_row_offsets, "kt hidden")
        return out


def _hidden_print(layer_idx, h, input_row_offsets, what: str) -> None:
    """Prints [layer, rows, max |h| and RMS of sequence 0's last row, of sequence 1's, ...]."""
    last = ops.cast(ops.gather(h, input_row_offsets[1:] - 1, axis=0), DType.float32)
    peak = ops.max(ops.abs(last), axis=-1)
    rms = ops.sqrt(ops.mean(last * last, axis=-1))
    head = [ops.reshape(ops.cast(layer_idx, DType.float32), [1]).to(h.device),
            ops.cast(input_row_offsets[-1:], DType.float32)]
    stats = ops.reshape(ops.concat([peak, rms], axis=-1), [-1])
    ops.print(ops.concat([*head, stats], axis=0).to(DeviceRef.CPU()),
              label=f"{what} [layer, rows, max|h_last|, rms(h_last), ...]")


def _norms(module):
    """Every RMSNorm of the graph's module tree, also the per-device copies that MAX's
    tensor-parallel blocks keep in plain lists (`input_layernorm_shards`, `norm_shards`)."""
    for _, m in module.named_modules():
        yield m
        for value in vars(m).values():
            if isinstance(value, (list, tuple)):
                yield from (v for v in value if isinstance(v, RMSNorm))


def _with_kt(spec):
    swapped = set()
    for module in _norms(spec.module) if "rms_norm" in KT_OPS else ():
        if type(module) is RMSNorm:
            module.__class__ = KtRMSNorm
            swapped.add(id(module))
    print(f"kt: {len(swapped)} RMSNorm layers call {OP} from {KERNELS}", file=sys.stderr, flush=True)
    attention = synced = blocks = 0
    for _, module in spec.module.named_modules():
        if type(module) is AttentionWithRope and "attention" in KT_OPS:
            module.__class__ = KtAttentionWithRope
            attention += 1
        elif type(module) is AttentionWithRope and CHECK_MODE == "sync":
            module.__class__ = SyncedAttentionWithRope
            synced += 1
        elif type(module) is TransformerBlock and CHECK_MODE == "hidden":
            module.__class__ = HiddenPrintingBlock
            blocks += 1
    print(f"kt: {attention} attention layers call {STORE_OP} + {ATTENTION_OP} from {KERNELS}",
          file=sys.stderr, flush=True)
    if CHECK_MODE:
        print(f"kt: KT_CHECK={CHECK_MODE} ({synced} of MAX's attention layers synced, {blocks} layers print "
              "their hidden state)", file=sys.stderr, flush=True)
    return dataclasses.replace(spec, custom_extensions=[*spec.custom_extensions, KERNELS])


class KtLlama3Model(Llama3Model):
    """Llama3Model whose decoder graph, on one device or tensor-parallel over several, uses
    KtRMSNorm (kt's package is attached to the graph, so every device gets kt's kernel)."""

    def _single_device_spec(self, model_config):
        return _with_kt(super()._single_device_spec(model_config))

    def _tensor_parallel_spec(self, model_config):
        return _with_kt(super()._tensor_parallel_spec(model_config))

    def _data_parallel_spec(self, model_config):
        raise NotImplementedError("kt's custom architecture supports one device")


ARCHITECTURES = [dataclasses.replace(llama_arch, pipeline_model=KtLlama3Model)]
