"""``jserve bench``: serving, throughput and latency benchmarks."""
