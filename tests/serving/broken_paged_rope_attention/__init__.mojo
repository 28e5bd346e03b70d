"""A planted broken `kt.paged_rope_attention` (queries not rotated), laid over a copy of kt's
package. Serving with it must change the model's output, which proves that MAX+kt's attention
is kt's."""
