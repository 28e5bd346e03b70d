"""A planted broken `kt.rms_norm` that forgets to normalize, laid over a copy of kt's package.
Serving with it must change the model's output, which proves `--custom-kernel-path` puts kt's
kernel in the path."""
