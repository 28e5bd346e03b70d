"""kt serve-bench: real serving engines, one workload, side-by-side TTFT/TPOT/ITL/throughput."""
