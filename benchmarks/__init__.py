"""Performance benchmarks: what compression buys, measured side by side in one run.

Each module measures one question and can run on its own (``python -m benchmarks.<name>``):

* ``ttft``: time to first token and end-to-end latency, retrieved text vs cached latents;
* ``throughput``: ``compress()`` against a bare encoder forward over the same batches;
* ``cache``: latent-store reads against re-encoding, and bytes per chunk (text, store, KV cache);
* ``scaling``: precompression time, store size and query latency from 1k to 100k chunks;
* ``gpu_h200``: 1 and 2 on a Qwen3-0.6B-shaped model in bf16 for an H200-class GPU (offline).

``python -m benchmarks.run_all`` (``make bench``) runs the CPU ones. Every figure is a median
over repetitions after warm-up, reported with ratios (this machine class is shared and noisy:
ratios measured in one run travel better than absolute times) and the load average. Results
(a table on stdout, JSON and PNG plots) go to ``benchmarks/results/``. Nothing here asserts a
time: targets are reported as met or missed, never enforced.
"""
