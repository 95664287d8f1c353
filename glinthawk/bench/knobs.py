"""Each benchmark suite's knobs, full-size (``DEFAULTS``) and ``--quick``, apart from the suites:
``glinthawk bench --help`` lists the defaults, and the suite modules import torch, which takes
seconds to load.
"""

from __future__ import annotations

LIMITS = {"read_mib": 512, "matmul_sizes": [512, 1024, 2048], "dtypes": "float32,bfloat16"}
LIMITS_QUICK = {"read_mib": 32, "matmul_sizes": [128, 256]}

ENGINE = {
    "batch": 128, "prompt": 16, "new_tokens": 128,
    "long_batch": 2, "long_prompt": 2048, "long_new_tokens": 128,  # as many new tokens: only the context differs
    "max_batch_tokens": 2048, "hf": True,
    "cuda_graphs": False,  # decode steps through CUDA graphs (--device cuda), captured before the timed run
    "llamacpp": "auto",  # llama-batched-bench as a baseline: auto (scripts/build_llamacpp.sh's, if built), off, PATH
    "llamacpp_args": "-fa on;-fa off",  # its option sets to try, ";" between: the fastest is the baseline
}
ENGINE_QUICK = {"batch": 8, "prompt": 8, "new_tokens": 8, "long_batch": 2, "long_prompt": 128, "long_new_tokens": 4,
                "llamacpp": "off"}  # its GGUF conversion alone takes longer than a quick run

KERNELS = {"contexts": [256, 512, 1024, 2048, 4096, 8192], "attn_batch": 64,
           "tokens": [1, 8, 32, 64, 128, 256, 512], "sample_rows": 128,
           "matmul_rows": [64, 128], "matmul_cycle_mib": 512}  # float32 weights cycled over more than a cache holds
KERNELS_QUICK = {"contexts": [32, 64, 128], "attn_batch": 4, "tokens": [1, 8, 64], "sample_rows": 8,
                 "matmul_rows": [8], "matmul_cycle_mib": 4}

CLUSTER = {"batch": 64, "prompt": 16, "new_tokens": 32, "tier2_nodes": [1, 2, 3], "micro_batches": 1,
           "max_batch_tokens": 2048, "mode": "processes"}
CLUSTER_QUICK = {"batch": 8, "prompt": 8, "new_tokens": 4, "tier2_nodes": [2]}

LATENCY = {"delays_ms": [0, 1, 5, 10, 20, 50], "in_flight": [1, 2, 4, 8, 16, "auto"], "batch": 0, "prompt": 4,
           "new_tokens": 8, "max_batch_tokens": 2048, "ordinary_batch": 128, "ordinary_prompt": 16,
           "ordinary_new_tokens": 128, "ordinary_tier2_nodes": 2, "ordinary_delays_ms": [10, 50]}
LATENCY_QUICK = {"delays_ms": [0, 5, 20], "in_flight": [1, 4, "auto"], "batch": 16, "prompt": 4, "new_tokens": 3,
                 "ordinary_batch": 8, "ordinary_new_tokens": 4, "ordinary_delays_ms": [5]}

MEMORY = {"sequences": 128, "prompt": 511, "new_tokens": 72, "max_batch_tokens": 1024,
          "checkpoints": [1024, 2048, 4096, 8192, 16384, 32768, 65536], "sample_ms": 25}
MEMORY_QUICK = {"sequences": 16, "prompt": 63, "new_tokens": 12, "max_batch_tokens": 128,
                "checkpoints": [128, 256, 512, 1024], "sample_ms": 10}

CAPACITY_INT8 = {"int8_contexts": [512, 2048], "int8_base_batch": [16, 8], "int8_new_tokens": 128,
                 "int8_repeats": 2, "int8_quality_tokens": 32}
CAPACITY_INT8_QUICK = {"int8_contexts": [64], "int8_base_batch": [2], "int8_new_tokens": 4, "int8_repeats": 1,
                       "int8_quality_tokens": 4}

CAPACITY = {"contexts": [512, 2048, 8192], "two_tier_batch": [32, 32, 2], "new_tokens": 128, "tier1_kv_mib": 48.0,
            "max_batch_tokens": 2048, "micro_batches": 1, **CAPACITY_INT8}
CAPACITY_QUICK = {"contexts": [32, 64, 128], "two_tier_batch": [8, 4, 2], "new_tokens": 4, "tier1_kv_mib": 0.1,
                  **CAPACITY_INT8_QUICK}

PIPELINE = {"batch": 64, "prompt": 16, "new_tokens": 32, "stages": [1, 2, 3], "micro_batches": [1, 2, 4, 6],
            "delay_ms": [0, 10], "tier2_nodes": 1, "max_batch_tokens": 2048,
            "rounds": 1}  # > 1: every count that many times, in turn, each figure the median
PIPELINE_QUICK = {"batch": 8, "prompt": 8, "new_tokens": 4, "stages": [1, 2], "micro_batches": [2], "delay_ms": [10]}

STRUCTURED = {"requests": 128, "max_tokens": 96, "max_batch_tokens": 2048}
STRUCTURED_QUICK = {"requests": 128, "max_tokens": 64}

PREFIX = {"requests": 512, "prefix": 1024, "suffix": 64, "new_tokens": 64, "max_seqs": 256, "max_batch_tokens": 2048,
          "n": 8, "repeats": 2}  # each repeat runs every workload twice: minutes where bf16 multiplies slowly
PREFIX_QUICK = {"requests": 32, "prefix": 256, "suffix": 16, "new_tokens": 8, "max_seqs": 32}

# What ``glinthawk bench --help`` lists and ``--set`` accepts, suite by suite.
DEFAULTS = {"limits": LIMITS, "engine": ENGINE, "kernels": KERNELS, "cluster": CLUSTER, "latency": LATENCY,
            "memory": MEMORY, "capacity": CAPACITY, "pipeline": PIPELINE, "structured": STRUCTURED,
            "prefix": PREFIX}
