"""Registers a kernel under one of MAX's own op names (`mo.reduce.row_mean_of_squares`) that
writes 7.0: if a graph given this package as a custom extension returns 7s, extensions override
MAX's named kernels."""
