"""MAX 26.7's paged KV cache as torch tensors, shared by `paged_rope_store` and
`paged_rope_attention`: the axes of a ragged batch over a paged cache, building such a cache
with random contents and a shuffled block table, and gathering its pages back to dense keys
and values for the references.

The layout is MAX's (`max/nn/kv_cache/cache_params.py`, `KVCacheParams.shape_per_block` and
the symbolic inputs of its paged collection):

    blocks         [P, 2, L, page, Hk, D]   page p; 0 = keys, 1 = values; layer; slot; head
    cache_lengths  [B]      uint32          tokens of sequence b in the cache before this step
    lookup_table   [B, NP]  uint32          the pages of sequence b, in order (0: unused)
    row_offsets    [B + 1]  uint32          the step's new tokens of b are rows
                                            row_offsets[b] .. row_offsets[b+1]-1 of q / k / v

Token t of sequence b that is new in this step (row row_offsets[b] + t) sits at position
cache_lengths[b] + t, in slot position % page of page lookup_table[b, position // page].
Page 0 is MAX's null block: no sequence owns it.

The batch is ragged by formula, so that every tensor's size follows from the axes: sequence
b has n_b = S - (b R) mod S new tokens and c_b = C - (3 b R) mod (C + 1) cached ones
(R = 0: every sequence has S new tokens after C cached ones). Unowned pages and the null
page are NaN, so a kernel that reads through an unused table entry produces NaN where the
reference has none. Slots of a sequence's own pages past its tokens are NaN too before a store
(what it must not write); for attention they hold large finite values (N(0, 1) x POISON): a
kernel may load them in a tile whose causal mask gives them zero weight (MAX's flash attention
does, in the last key tile of a sequence), but any weight on them shows as a large error.
"""

from __future__ import annotations

import torch

from harness.spec import Axis, Shape, TensorArg, Tensors

U32 = "uint32"


def new_tokens(shape: Shape) -> list[int]:
    s, r = shape["S"], shape["R"]
    return [s - (b * r) % s for b in range(shape["B"])]


def cached_tokens(shape: Shape) -> list[int]:
    c, r = shape["C"], shape["R"]
    return [c - (3 * b * r) % (c + 1) for b in range(shape["B"])]


def pages_per_seq(shape: Shape) -> list[int]:
    page = shape["page"]
    return [-(-(c + n) // page) for c, n in zip(cached_tokens(shape), new_tokens(shape))]


def axes(ci_s: int = 70, ci_c: int = 200) -> tuple[Axis, ...]:
    """The batch and cache axes both paged ops share (heads and head dim are the spec's)."""
    return (
        Axis("B", lo=1, hi=4, edges=(1,), ci_hi=3, doc="sequences in the batch"),
        Axis("S", lo=1, hi=300, edges=(1, 2, 127, 128, 129), ci_hi=ci_s,
             doc="new tokens of the longest sequence (ragged: see R)"),
        Axis("C", lo=0, hi=600, edges=(0, 1, 127, 128), ci_hi=ci_c,
             doc="cached tokens of the sequence with the most"),
        Axis("R", lo=0, hi=97, edges=(0, 1), ci_hi=13,
             doc="raggedness: n_b = S - (b R) mod S, c_b = C - (3 b R) mod (C + 1)"),
        Axis("page", choices=(1, 3, 16, 64, 128, 256), ci_hi=128, doc="tokens per page"),
        Axis("L", lo=1, hi=3, edges=(1,), ci_hi=2, doc="layers in the cache"),
    )


DERIVED = {
    "T": lambda s: sum(new_tokens(s)),
    "B1": lambda s: s["B"] + 1,
    "KV": lambda s: 2,
    # the null page, each sequence's pages, one spare page nobody owns
    "P": lambda s: 2 + sum(pages_per_seq(s)),
    # one column more than the longest sequence needs, as MAX pads its table
    "NP": lambda s: max(pages_per_seq(s)) + 1,
}

BLOCKS = ("P", "KV", "L", "page", "Hk", "D")


def index_args() -> tuple[TensorArg, ...]:
    return (TensorArg("cache_lengths", ("B",), U32), TensorArg("lookup_table", ("B", "NP"), U32),
            TensorArg("row_offsets", ("B1",), U32))


def layer_ok(shape: Shape, params) -> bool:
    return params["layer"] < shape["L"]


POISON = 1e3  # the scale of the finite values past a sequence's tokens in its own pages


def make_cache(shape: Shape, dtype: torch.dtype, device, gen: torch.Generator,
               filled: bool) -> Tensors:
    """blocks and the three index tensors. `filled`: slots of the new tokens hold keys and
    values already (what attention reads); otherwise they are NaN (what the store fills)."""
    b, page = shape["B"], shape["page"]
    cache, new, npages = cached_tokens(shape), new_tokens(shape), pages_per_seq(shape)
    blocks = torch.full([shape[d] for d in BLOCKS], float("nan"))
    # draws on the generator's device (kt microbench's is the GPU's), the cache built on the CPU
    order = (torch.randperm(shape["P"] - 1, generator=gen, device=gen.device) + 1).tolist()
    table = torch.zeros(b, shape["NP"], dtype=torch.int64)
    def fill(owned: torch.Tensor, pos: torch.Tensor, scale: float) -> None:
        blocks[owned[pos // page], :, :, pos % page] = scale * torch.randn(
            (len(pos), *blocks.shape[1:3], *blocks.shape[4:]), generator=gen, device=gen.device).cpu()

    for i in range(b):
        owned, order = order[: npages[i]], order[npages[i]:]
        owned = torch.tensor(owned, dtype=torch.int64)
        table[i, : npages[i]] = owned
        written = cache[i] + (new[i] if filled else 0)
        fill(owned, torch.arange(written), 1.0)
        if filled:  # the rest of its pages: loaded under a mask at most, never weighed
            fill(owned, torch.arange(written, npages[i] * page), POISON)
    offsets = torch.tensor([0] + new, dtype=torch.int64).cumsum(0)
    return {"blocks": blocks.to(device=device, dtype=dtype),
            "cache_lengths": _u32(torch.tensor(cache), device),
            "lookup_table": _u32(table, device), "row_offsets": _u32(offsets, device)}


def _u32(x: torch.Tensor, device) -> torch.Tensor:
    return x.to(device=device, dtype=torch.uint32)


def sequences(inputs: Tensors) -> list[tuple[int, int, int]]:
    """(first row, new tokens, cached tokens) of each sequence of the batch."""
    off = inputs["row_offsets"].to(torch.int64).tolist()
    cache = inputs["cache_lengths"].to(torch.int64).tolist()
    return [(off[i], off[i + 1] - off[i], cache[i]) for i in range(len(cache))]


def max_lengths(inputs: Tensors) -> tuple[int, int]:
    """(the most new tokens of a sequence, the longest sequence after the step: cached + new),
    as MAX's paged collection carries them (`max_prompt_length`, `max_cache_length`)."""
    seqs = sequences(inputs)
    return max((n for _, n, _ in seqs), default=0), max((c + n for _, n, c in seqs), default=0)


def slots(inputs: Tensors, seq: int, positions: range) -> tuple[torch.Tensor, torch.Tensor]:
    """(page, slot) of each position of sequence `seq`, through the block table."""
    page = inputs["blocks"].shape[3]
    pos = torch.tensor(list(positions), dtype=torch.int64)
    table = inputs["lookup_table"].to(torch.int64)[seq].cpu()
    return table[pos // page], pos % page


def gather(inputs: Tensors, seq: int, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [length, Hk, D] of positions 0..length-1 of sequence `seq`."""
    pages, slot = slots(inputs, seq, range(length))
    blocks = inputs["blocks"]
    pages, slot = pages.to(blocks.device), slot.to(blocks.device)
    return blocks[pages, 0, layer, slot], blocks[pages, 1, layer, slot]


def full_shape(b: int, s: int, c: int, r: int, page: int, layers: int, **heads: int) -> Shape:
    """A complete shape (free and derived axes) for golden cases; `heads` adds Hk, D and, for
    attention, group with its derived Hq."""
    shape = {"B": b, "S": s, "C": c, "R": r, "page": page, "L": layers, **heads}
    if "group" in heads:
        shape["Hq"] = heads["Hk"] * heads["group"]
    for name, fn in DERIVED.items():
        shape[name] = fn(shape)
    return shape


def index_bytes(shape: Shape) -> int:
    """cache_lengths, lookup_table and row_offsets, 4 bytes an entry."""
    return 4 * (shape["B"] + shape["B"] * shape["NP"] + shape["B1"])


def live_tokens(shape: Shape) -> int:
    """Tokens in the cache after the step, over the batch (what attention reads)."""
    return sum(new_tokens(shape)) + sum(cached_tokens(shape))


def triton_index(inputs: Tensors) -> tuple[torch.Tensor, ...]:
    """int32 copies of the index tensors for the Triton twins, with the sequence of each row
    (Triton has no uint32 loads from torch's uint32 tensors): (seq, cache, offsets, table)."""
    offsets = inputs["row_offsets"].to(torch.int64)
    rows = torch.arange(int(offsets[-1]), device=offsets.device)
    seq = torch.searchsorted(offsets, rows, right=True) - 1
    return tuple(x.to(torch.int32).contiguous() for x in (
        seq, inputs["cache_lengths"].to(torch.int64), offsets,
        inputs["lookup_table"].to(torch.int64)))


# --- stock MAX on the same cache, timed by `kt microbench` ---------------------------------
# MAX's Python modules are imported inside the functions, for start-up time.

def _max_paged_graph(kind: str, dtype: torch.dtype, device: str, blocks_shape, q_heads: int,
                     layer: int, scale: float):
    """A MAX graph of MAX 26.7's own paged kernels over a cache of `blocks_shape` (heads, head
    dim, layers and page size static, as MAX's kernels need them): `kind` "store" is
    `rope_ragged` on k (half rotation, from a cos/sin table) then `mo.kv_cache.store.paged.ragged`
    for k and v; "attention" is `rope_ragged` on q then `mo.mha.ragged.paged` (causal)."""
    from max import driver, engine
    from max.dtype import DType
    from max.graph import BufferType, DeviceRef, Graph, TensorType, ops
    from max.nn.attention import MHAMaskVariant
    from max.nn.kernels import (flash_attention_ragged, rope_ragged, store_k_cache_ragged,
                                store_v_cache_ragged)
    from max.nn.kv_cache import MHAKVCacheParams, PagedCacheValues

    from harness.build import max_dtype

    _, _, layers, page, hk, d = blocks_shape
    dev = DeviceRef.CPU() if device == "cpu" else DeviceRef.GPU(0)
    cpu = DeviceRef.CPU()
    io = max_dtype(dtype)
    params = MHAKVCacheParams(dtype=io, head_dim=d, num_layers=layers, devices=[dev],
                              n_kv_heads=hk, page_size=page)
    rows = [TensorType(io, ["T", hk, d], dev), TensorType(io, ["T", hk, d], dev)] \
        if kind == "store" else [TensorType(io, ["T", q_heads, d], dev)]
    types = rows + [
        BufferType(io, ["P", 2, layers, page, hk, d], dev),
        TensorType(DType.uint32, ["B"], dev), TensorType(DType.uint32, ["B", "NP"], dev),
        TensorType(DType.uint32, ["B1"], dev),
        TensorType(DType.int64, [1], cpu), TensorType(DType.uint32, [1], cpu),
        TensorType(DType.uint32, [1], cpu), params.dispatch_metadata_spec().tensor_type(dev),
        TensorType(DType.float32, ["positions", d], dev)]
    name = f"max_paged_{kind}_{q_heads}_{hk}_{d}_{layers}_{page}_{layer}"
    with Graph(name, input_types=types) as g:
        values = list(g.inputs)
        x = [v.tensor for v in values[:len(rows)]]
        blocks, cache, table, offsets, stride, max_prompt, max_cache, meta, freqs = \
            values[len(rows):]
        kv = PagedCacheValues(kv_blocks=blocks.buffer, cache_lengths=cache.tensor,
                              lookup_table=table.tensor, max_prompt_length=max_prompt.tensor,
                              max_cache_length=max_cache.tensor, page_stride=stride.tensor,
                              attention_dispatch_metadata=meta.tensor)
        layer_idx = ops.constant(layer, DType.uint32, device=cpu)
        rotated = rope_ragged(x[0], offsets.tensor, cache.tensor, freqs.tensor, interleaved=False)
        if kind == "store":
            store_k_cache_ragged(kv, rotated, offsets.tensor, layer_idx)
            store_v_cache_ragged(kv, x[1], offsets.tensor, layer_idx)
            g.output()
        else:
            g.output(flash_attention_ragged(params, rotated, offsets.tensor, kv, layer_idx,
                                            MHAMaskVariant.CAUSAL_MASK, scale))
    max_device = driver.CPU() if device == "cpu" else driver.Accelerator(0)
    return engine.InferenceSession(devices=[max_device]).load(g), max_device, params


def max_paged_provider(kind: str, scale_of=None):
    """prepare(device, dtype) -> bind(inputs, params) for stock MAX's paged kernels (see
    `_max_paged_graph`), one graph per static configuration, compiled at its first case.
    The cache is copied once per bind; the store updates the copy on every call."""

    def prepare(device: str, dtype: torch.dtype):
        models: dict = {}

        def bind(inputs: Tensors, params):
            import numpy as np
            from max import driver

            from harness.build import buffers_to_torch, max_model_bound
            from pykernels._common import triton_inv_freq

            rows = [inputs["k"], inputs["v"]] if kind == "store" else [inputs["q"]]
            blocks = inputs["blocks"].clone(memory_format=torch.contiguous_format)
            d = blocks.shape[-1]
            q_heads = rows[0].shape[1]
            scale = scale_of(params, d) if scale_of else 0.0
            key = (tuple(blocks.shape[1:]), q_heads, int(params["layer"]), scale)
            if key not in models:
                models[key] = _max_paged_graph(kind, dtype, device, blocks.shape, q_heads,
                                               int(params["layer"]), scale)
            model, max_device, kv_params = models[key]
            seqs = sequences(inputs)
            max_prompt, max_cache = max_lengths(inputs)
            angle = torch.arange(max(1, max_cache), device=blocks.device,
                                 dtype=torch.float32)[:, None] * triton_inv_freq(d, params,
                                                                               blocks.device)
            freqs = torch.stack((angle.cos(), angle.sin()), dim=-1).reshape(-1, d).contiguous()
            keep = [x.contiguous() for x in rows] + [blocks] + [
                inputs[n].contiguous() for n in ("cache_lengths", "lookup_table", "row_offsets")]
            args = [driver.Buffer.from_dlpack(x) for x in keep]
            meta = kv_params.resolve_attn_key(len(seqs), max_prompt, max_cache)
            args += [driver.Buffer.from_numpy(np.array([-1], dtype=np.int64)),
                     driver.Buffer.from_numpy(np.array([max_prompt], dtype=np.uint32)),
                     driver.Buffer.from_numpy(np.array([max_cache], dtype=np.uint32)),
                     meta.pack_into_buffer(max_device, max_cache),
                     driver.Buffer.from_dlpack(freqs)]
            keep.append(freqs)

            def to_torch(bufs):
                return tuple(buffers_to_torch(bufs, device)) + (blocks,)

            bound = max_model_bound(model, max_device, args, keep, device, to_torch)
            bound.note = ("MAX's rope_ragged on k, then mo.kv_cache.store.paged.ragged (k, v)"
                          if kind == "store" else
                          "MAX's rope_ragged on q, then mo.mha.ragged.paged (causal)")
            return bound

        return bind

    return prepare
