"""The score and softmax steps of a tiled split-KV decode, shared by the paged
(`paged_rope_attention._tiled_decode_gpu`) and dense
(`fused_rope_attention._dense_tiled_decode_gpu`) kernels.

A key is read by a group of TPK lanes (TPK a power of two dividing 32), each holding its own
slice of the key's dims; a group takes a tile of U consecutive keys at a time, for GB q heads of
one kv head. The N = U GB (key, head) scores of a tile are numbered v = u GB + g. Lane t of the
group has f = R (t / DUP), R = max(1, N / TPK) the scores a lane ends with and DUP =
max(1, TPK / N) the lanes holding each, and keeps its registers in the order v ^ f: its entry u
of the tile is key u ^ f / GB, its query entry g is head g ^ f % GB, so its partial dot product
(over its dims) in entry e = u GB + g belongs to score e ^ f.

Reduce-scatter (recursive halving), steps k = 0 .. log2 min(N, TPK) - 1 with lane mask
mk = TPK >> (k + 1) and half h = N >> (k + 1): entry e < h += partner (lane ^ mk)'s entry
e + h. The partner's f is f ^ h, so its entry e + h holds score (e + h) ^ f ^ h = e ^ f: the
same score. Invariant after step k: entry e < h of lane t holds score e ^ f summed over the
2^(k+1) lanes that differ from t only in the bits mk .. TPK / 2. No lane selects: the half kept
is always the lower. Then a butterfly over the lane bits below DUP (lanes with the same f)
completes the sums. Lane t then holds, in entry r < R, the full score f + r: key f / GB of the
tile, head f % GB + r (R <= GB).

Softmax. The lanes holding a head's U scores differ in the lane bits TPK / U .. TPK / 2; a max
butterfly over them gives the tile's maximum, and m (kept per lane for its R heads, equal in
those lanes) moves to it when it passes m by more than LAZY_MAX; when m moves in any lane of
the warp (a vote), the correction exp2(m - m_new) rescales l and, shuffled to the lanes as
below, the accumulators. p = exp2(score - m), one a score; l (per lane, for its key of the
tile) += p.

Values. Entry (u, g) of the output needs p of score (u GB + g) ^ f, which lane
t ^ ((u GB + g) / R) DUP holds in entry (u GB + g) % R (f of that lane is
f ^ R ((u GB + g) / R)): one xor shuffle each (`tile_pick`). The head corrections come the
same way (u = 0).

At the end l is summed over the key lanes (bits TPK / U .. TPK / 2), and m and l are gathered
into the accumulators' head order (entry g: head g ^ f % GB).
"""

from max.gpu.primitives.warp import shuffle_xor, vote
from std.math import exp2, inf
from std.utils import StaticTuple

# A tiled decode moves a head's running maximum only when a score passes it by more than this
# (log2 units), so its probabilities are at most 2^LAZY_MAX and most tiles skip the accumulator
# rescale.
comptime LAZY_MAX = Float32(8)


def _merge_scale(m: Float32, m_new: Float32) -> Float32:
    """exp2(m - m_new), 0 for an empty softmax state (m = -inf)."""
    return Float32(0) if m == -inf[DType.float32]() else exp2(m - m_new)


@always_inline
def tile_reduce_scatter[N: Int, TPK: Int](mut s: StaticTuple[Float32, N]):
    """The reduce-scatter and butterfly above: on return entry r < R of lane t holds the full
    score f + r."""
    comptime R = max(1, N // TPK)
    comptime DUP = max(1, TPK // N)
    comptime for k in range(5):
        comptime h = N >> (k + 1)
        comptime mk = TPK >> (k + 1)
        comptime if h >= 1 and mk >= 1:
            comptime for e in range(h):
                s[e] += shuffle_xor(s[e + h], UInt32(mk))
    comptime for k in range(5):
        comptime mk = DUP >> (k + 1)
        comptime if mk >= 1:
            comptime for r in range(R):
                s[r] += shuffle_xor(s[r], UInt32(mk))


@always_inline
def tile_softmax[
    N: Int, TPK: Int, U: Int, R: Int
](
    s: StaticTuple[Float32, N], mut m: StaticTuple[Float32, R], mut l: StaticTuple[Float32, R]
) -> Tuple[Bool, StaticTuple[Float32, R], StaticTuple[Float32, R]]:
    """One tile's softmax step on the lane's R scores s[0 .. R - 1] (-inf for keys past the
    end): (rescale, corr, p). rescale (warp-uniform) says that m moved in some lane of the warp;
    then l was multiplied by corr and the caller multiplies its accumulators by it (through
    `tile_pick`). p[r] = exp2(s[r] - m[r]) (0 while m is -inf), already added to l.
    R = max(1, N / TPK)."""
    comptime NEG_INF = -inf[DType.float32]()
    var m_new = StaticTuple[Float32, R](fill=NEG_INF)
    var moved = False
    comptime for r in range(R):
        var mx = s[r]
        comptime for k in range(5):
            comptime mk = (TPK // U) << k
            comptime if mk < TPK:
                mx = max(mx, shuffle_xor(mx, UInt32(mk)))
        m_new[r] = mx if mx > m[r] + LAZY_MAX else m[r]
        moved = moved or m_new[r] != m[r]
    var corr = StaticTuple[Float32, R](fill=0)
    var rescale = vote[DType.uint32](moved) != 0
    if rescale:
        comptime for r in range(R):
            corr[r] = _merge_scale(m[r], m_new[r])
            l[r] = l[r] * corr[r]
            m[r] = m_new[r]
    var p = StaticTuple[Float32, R](fill=0)
    comptime for r in range(R):
        p[r] = Float32(0) if m[r] == NEG_INF else exp2(s[r] - m[r])
        l[r] += p[r]
    return (rescale, corr, p)


@always_inline
def tile_pick[R: Int, DUP: Int, e: Int](x: StaticTuple[Float32, R]) -> Float32:
    """The value of score e ^ f of a per-lane quantity x (entry r: score f + r): entry e % R
    of lane t ^ (e / R) DUP."""
    comptime src = (e // R) * DUP
    var v = x[e % R]
    comptime if src != 0:
        v = shuffle_xor(v, UInt32(src))
    return v


@always_inline
def tile_finish[
    TPK: Int, U: Int, R: Int, DUP: Int, GB: Int
](m: StaticTuple[Float32, R], l_in: StaticTuple[Float32, R]) -> Tuple[
    StaticTuple[Float32, GB], StaticTuple[Float32, GB]
]:
    """(m, l) per accumulator entry g (head g ^ f % GB): l summed over the tile's key lanes,
    then both gathered with `tile_pick`."""
    var l = l_in
    comptime for r in range(R):
        comptime for k in range(5):
            comptime mk = (TPK // U) << k
            comptime if mk < TPK:
                l[r] += shuffle_xor(l[r], UInt32(mk))
    var m_h = StaticTuple[Float32, GB](fill=-inf[DType.float32]())
    var l_h = StaticTuple[Float32, GB](fill=0)
    comptime for g in range(GB):
        m_h[g] = tile_pick[R, DUP, g](m)
        l_h[g] = tile_pick[R, DUP, g](l)
    return (m_h, l_h)
