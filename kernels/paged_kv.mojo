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

    def value_offset(self) -> Int:
        """How far a value row sits past its key row: row(p, 1, s, h) - row(p, 0, s, h)."""
        return self.layers * self.page_size * self.kv_heads * self.head_dim

    def key_rows(self, seq: Int, head: Int, offset: Int) -> KeyRows:
        """The key rows of sequence seq, kv head `head`, `offset` elements into each row:
        `key_rows(seq, head, offset).row(table, pos) == token_row(table, seq, pos, 0, head)
        + offset`, since `row(p, 0, s, h) = p * 2 L P Hk D + s * Hk D + (layer P Hk + h) D`
        (L layers, P the page size, Hk kv heads, D the head dim)."""
        return KeyRows(
            seq * self.table_cols,
            UInt32(self.page_size),
            UInt32(2 * self.value_offset()),
            UInt32(self.kv_heads * self.head_dim),
            (self.layer * self.page_size * self.kv_heads + head) * self.head_dim + offset,
        )


@fieldwise_init
struct KeyRows(TrivialRegisterPassable):
    """`PagedLayout.row` for the keys of one sequence and kv head, a fixed offset into each
    row, with 32-bit page arithmetic: position pos sits in slot pos % page of the page at
    table entry first + pos / page, and its key row is page * page_stride + slot *
    slot_stride + base (its value row `PagedLayout.value_offset()` further), the first
    product 32 x 32 -> 64 bits, the second 32-bit (positions and a page's elements
    2 L P Hk D below 2^32). A kernel walking the keys in order can keep (entry, slot) of a
    position and step it (`step`) instead of dividing each time."""

    var first: Int
    var page: UInt32
    var page_stride: UInt32
    var slot_stride: UInt32
    var base: Int

    def row(self, table: U32Ptr, pos: Int) -> Int:
        """The key row of position pos."""
        var p = UInt32(pos)
        return self.row_at(table, Int(p // self.page), p % self.page)

    def locate(self, pos: Int) -> Tuple[Int, UInt32]:
        """(entry, slot) of position pos: its page is the sequence's entry-th."""
        var p = UInt32(pos)
        return (Int(p // self.page), p % self.page)

    def step(self, entry: Int, slot: UInt32, n: UInt32) -> Tuple[Int, UInt32]:
        """(entry, slot) of the position n past (entry, slot) (subtracting instead of
        dividing: n / page + 1 rounds)."""
        var e = entry
        var s = slot + n
        while s >= self.page:
            s -= self.page
            e += 1
        return (e, s)

    def row_at(self, table: U32Ptr, entry: Int, slot: UInt32) -> Int:
        """The key row of slot `slot` of the sequence's entry-th page."""
        var p = table[unsafe_offset=self.first + entry].cast[DType.uint64]()
        var page_row = p * self.page_stride.cast[DType.uint64]()
        return Int(page_row) + Int(slot * self.slot_stride) + self.base


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
