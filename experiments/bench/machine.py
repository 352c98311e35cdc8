"""What a benchmark reports about the machine it ran on: the CPU model, and its measured
matmul peak and memory read bandwidth (the ceilings decoding figures are compared with)."""

from __future__ import annotations

import platform
import time
from pathlib import Path


def cpu_model() -> str:
    """/proc/cpuinfo's model name and which of AVX-512, AVX512-BF16 and AMX-BF16 it reports."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name")), "unknown")
    flags = next((set(line.split(":", 1)[1].split()) for line in info.splitlines()
                  if line.startswith("flags")), set())
    units = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(units) or 'no AVX-512'})"


def timed(function) -> float:
    """Seconds `function()` takes."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 GFLOP/s of an n^3 JAX matmul."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    return 2 * n**3 / min(timed(lambda: matmul(a, a).block_until_ready())
                          for _ in range(repeats)) / 1e9


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Best GB/s of reading a `gib` GiB float32 array once (a jitted sum)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((int(gib * 2**28),), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return x.nbytes / min(timed(lambda: total(x).block_until_ready())
                          for _ in range(repeats)) / 1e9
