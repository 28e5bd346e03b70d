"""A planted broken `kt.paged_rope_store` (keys stored without RoPE), laid over a copy of kt's
package. Serving with it must change the model's output, which proves that MAX+kt's attention
reads the keys kt's store wrote."""
