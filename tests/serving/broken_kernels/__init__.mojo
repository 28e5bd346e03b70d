"""A planted broken kt package: `kt.rms_norm` that forgets to normalize. Serving with it must
change the model's output, which proves `--custom-kernel-path` puts kt's kernel in the path."""
