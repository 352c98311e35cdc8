"""What a benchmark reports about the machine it ran on: the CPU model, and its measured
matmul peak and memory read bandwidth (the ceilings decoding figures are compared with)."""

from __future__ import annotations

import platform
import time
from pathlib import Path


def cpu_model() -> str:
    """/proc/cpuinfo's model name, CPU family and model numbers, and which of AVX-512,
    AVX512-BF16 and AMX-BF16 it reports. A virtual machine's "AMD EPYC" alone does not say the
    generation: family 23 model 1 (Zen 1, two 128-bit FMA pipes) has half the float32 matmul
    peak of family 25 (Zen 3), so the family and model are part of the name."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    first = {}
    for line in info.splitlines():
        key, _, value = line.partition(":")
        first.setdefault(key.strip(), value.strip())
    flags = set(first.get("flags", "").split())
    units = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (f"{first.get('model name', 'unknown')} (family {first.get('cpu family', '?')} "
            f"model {first.get('model', '?')}; {', '.join(units) or 'no AVX-512'})")


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
