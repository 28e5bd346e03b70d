"""Addressing MAX 26.7's paged KV cache from the raw tensors its paged collection is built of.

blocks [P, 2, L, page, Hk, D]: page p, 0 = keys / 1 = values, layer, slot, kv head, dim
(MAX's `KVCacheParams.shape_per_block` behind a leading page dim, packed pages).
lookup_table [B, NP] (uint32): the pages of sequence b in order. cache_lengths [B] (uint32):
tokens of sequence b cached before this step. row_offsets [B + 1] (uint32): the step's new
tokens of b are rows row_offsets[b] .. row_offsets[b + 1] - 1, and new token t of b sits at
position cache_lengths[b] + t. Position pos of sequence b lives in slot pos % page of page
lookup_table[b, pos // page].
"""

comptime U32Ptr = Pointer[UInt32, MutAnyOrigin]


@fieldwise_init
struct PagedLayout(TrivialRegisterPassable):
    """One layer of the paged cache: element offsets of head rows, and page lookup."""

    var page_size: Int
    var layers: Int
    var kv_heads: Int
    var head_dim: Int
    var layer: Int
    var table_cols: Int

    def row(self, page: Int, kv: Int, slot: Int, head: Int) -> Int:
        """Offset of the head vector (page, kv, this layer, slot, head) in blocks."""
        return (
            (((page * 2 + kv) * self.layers + self.layer) * self.page_size + slot) * self.kv_heads
            + head
        ) * self.head_dim

    def token_row(self, table: U32Ptr, seq: Int, pos: Int, kv: Int, head: Int) -> Int:
        """Offset of the head vector of position pos of sequence seq (kv 0 keys, 1 values)."""
        var page = Int(table[unsafe_offset=seq * self.table_cols + pos // self.page_size])
        return self.row(page, kv, pos % self.page_size, head)


def seq_of_row(row_offsets: U32Ptr, batch: Int, row: Int) -> Int:
    """The sequence whose new tokens include `row`: the last b with row_offsets[b] <= row."""
    var lo = 0
    var hi = batch - 1
    while lo < hi:
        var mid = (lo + hi + 1) // 2
        if Int(row_offsets[unsafe_offset=mid]) <= row:
            lo = mid
        else:
            hi = mid - 1
    return lo
