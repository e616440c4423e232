"""Shared benchmark plumbing: compile, warm up, time interleaved rounds, measure memory.

Every benchmark script in this package times through these functions, so that
compile time is always ``jit(fn).lower(...)`` + ``.compile()`` measured apart
from run time, every timed call ends with ``jax.block_until_ready``, and the
methods being compared are timed round-robin (a load spike from another
process on a shared machine then hits all of them alike).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import importlib
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import threading
import time
from typing import Any, Callable, Sequence

import jax


def log(message: str) -> None:
  """Progress on stderr, so stdout stays the report."""
  print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- programs


@dataclasses.dataclass
class Program:
  """A compiled computation bound to its arguments, ready to be timed.

  Attributes:
    call: runs the computation once (asynchronously; the caller blocks).
    lower_s: seconds to trace and lower to StableHLO.
    compile_s: seconds for XLA to compile.
    arg_bytes: bytes of the arguments (params, inputs, optimizer state),
      resident before the call.
    xla_bytes: XLA's buffer assignment: arguments + temporaries + outputs
      - aliased; ``None`` where the backend does not report it.
    warmup: a cheaper call that compiles and warms the same executables (a
      Python loop over members warms up on one member); default ``call``.
    warmup_scale: how many warm-ups one ``call`` costs, to plan repeats.
  """

  call: Callable[[], Any]
  lower_s: float
  compile_s: float
  arg_bytes: int
  xla_bytes: int | None
  warmup: Callable[[], Any] | None = None
  warmup_scale: float = 1.0


def compile_program(fn: Callable, *args, donate_argnums: tuple[int, ...] = ()) -> Program:
  """``jax.jit(fn)`` lowered and compiled for ``args``, each phase timed."""
  start = time.perf_counter()
  lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - lowered_at
  return Program(call=lambda: compiled(*args), lower_s=lowered_at - start, compile_s=compile_s,
                 arg_bytes=tree_bytes(args), xla_bytes=xla_bytes(compiled))


def compile_executable(fn: Callable, *args, donate_argnums: tuple[int, ...] = ()):
  """(compiled executable, lower s, compile s, XLA bytes): for programs made of several pieces."""
  start = time.perf_counter()
  lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  return compiled, lowered_at - start, time.perf_counter() - lowered_at, xla_bytes(compiled)


def xla_bytes(compiled) -> int | None:
  """Arguments + temporaries + outputs - aliased bytes from XLA's buffer assignment."""
  try:
    stats = compiled.memory_analysis()
  except Exception:  # Not every backend implements it; the number is optional.
    return None
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.temp_size_in_bytes
             + stats.output_size_in_bytes - stats.alias_size_in_bytes)


def tree_bytes(tree) -> int:
  """Bytes of the array leaves of ``tree`` (PRNG keys count their key data)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    total += int(getattr(leaf, "nbytes", 0))
  return total


# --------------------------------------------------------------------------- memory


class MemoryProbe:
  """Peak memory growth during one call.

  * GPU/TPU (``device.memory_stats()`` available): ``peak_bytes_in_use``
    after the call minus ``bytes_in_use`` before it. The peak is a
    high-water mark since process start, so a call that needs less than an
    earlier one reports the earlier peak (an upper bound).
  * CPU (no ``memory_stats``): the process's resident set size, sampled every
    millisecond by a thread while the call runs, minus the RSS just before it,
    after ``gc.collect()`` and glibc ``malloc_trim(0)`` so that memory freed by
    earlier calls is returned to the OS instead of being silently reused.
    Spikes shorter than a millisecond can be missed.
  """

  def __init__(self, device: jax.Device | None = None):
    self.device = device or jax.devices()[0]
    self.kind = "device" if self.device.memory_stats() else "rss"
    self._libc = _load_libc()

  @property
  def description(self) -> str:
    if self.kind == "device":
      return ("device.memory_stats(): peak_bytes_in_use after the call - bytes_in_use before "
              "(high-water mark: an upper bound when an earlier call peaked higher)")
    return ("process RSS sampled every 1 ms during the warm-up call, minus RSS before it "
            "(after gc.collect() and malloc_trim(0))")

  def measure(self, call: Callable[[], Any]) -> tuple[int, float]:
    """(peak growth in bytes, seconds) of one blocking call."""
    gc.collect()
    if self.kind == "device":
      before = self.device.memory_stats()["bytes_in_use"]
      seconds = time_call(call)
      return max(0, self.device.memory_stats()["peak_bytes_in_use"] - before), seconds
    if self._libc is not None:
      self._libc.malloc_trim(0)
    sampler = _RssSampler()
    before = sampler.rss()
    sampler.start()
    try:
      seconds = time_call(call)
    finally:
      peak = sampler.stop()
    return max(0, peak - before), seconds

  def budget_bytes(self, fraction: float = 0.8) -> int | None:
    """Usable device memory (GPU: ``bytes_limit``), or None on CPU."""
    if self.kind == "device":
      return int(self.device.memory_stats().get("bytes_limit", 0) * fraction) or None
    return None


def _load_libc():
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc
  except (OSError, AttributeError):
    return None


class _RssSampler:
  """Samples this process's RSS from /proc/self/statm on a background thread."""

  def __init__(self, period_s: float = 1e-3):
    self.period_s = period_s
    self.peak = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._page = os.sysconf("SC_PAGE_SIZE")

  def rss(self) -> int:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * self._page

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self.rss())
      self._stop.wait(self.period_s)

  def start(self):
    self.peak = self.rss()
    self._thread.start()

  def stop(self) -> int:
    self._stop.set()
    self._thread.join()
    return max(self.peak, self.rss())


def available_ram_bytes() -> int | None:
  """MemAvailable from /proc/meminfo (Linux), else None."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


# --------------------------------------------------------------------------- timing


def time_call(call: Callable[[], Any]) -> float:
  """Wall seconds of one call, including waiting for its results."""
  start = time.perf_counter()
  jax.block_until_ready(call())
  return time.perf_counter() - start


@dataclasses.dataclass
class Measurement:
  """Everything measured about one program in one comparison."""

  lower_s: float
  compile_s: float
  warmup_s: float
  times_s: list[float]
  arg_bytes: int
  growth_bytes: int
  xla_bytes: int | None

  @property
  def median_s(self) -> float:
    return statistics.median(self.times_s)

  @property
  def min_s(self) -> float:
    return min(self.times_s)

  @property
  def peak_bytes(self) -> int:
    """Resident arguments plus the measured growth during the call."""
    return self.arg_bytes + self.growth_bytes


def compare(programs: dict[str, Program], probe: MemoryProbe, *, max_repeats: int,
            budget_s: float, label: str = "") -> dict[str, Measurement]:
  """Warms up every program (measuring its memory), then times them round-robin.

  Each program gets ``min(max_repeats, budget_s // warm-up time)`` timed
  calls, at least one: cheap programs get every round, a program that takes
  a minute gets one. Round ``i`` times every program that still has calls
  left, in a fixed order, so a load spike hits the programs of a round alike.
  """
  warm = {}
  for name, program in programs.items():
    log(f"{label} warm-up {name} ...")
    warm[name] = probe.measure(program.warmup or program.call)
  repeats = {}
  for name, (_, seconds) in warm.items():
    call_s = max(seconds * programs[name].warmup_scale, 1e-9)
    repeats[name] = max(1, min(max_repeats, int(budget_s // call_s)))
  times: dict[str, list[float]] = {name: [] for name in programs}
  for round_index in range(max(repeats.values(), default=0)):
    log(f"{label} round {round_index + 1}/{max(repeats.values())}")
    for name, program in programs.items():
      if round_index < repeats[name]:
        times[name].append(time_call(program.call))
  return {name: Measurement(lower_s=p.lower_s, compile_s=p.compile_s, warmup_s=warm[name][1],
                            times_s=times[name], arg_bytes=p.arg_bytes,
                            growth_bytes=warm[name][0], xla_bytes=p.xla_bytes)
          for name, p in programs.items()}


def paired_ratio(times_a: Sequence[float], times_b: Sequence[float]) -> float:
  """Median over shared rounds of ``a / b`` (round ``i`` of both ran back to back)."""
  pairs = list(zip(times_a, times_b))
  return statistics.median(a / b for a, b in pairs)


# --------------------------------------------------------------------------- machine


def import_bench_dependency(name: str) -> Any:
  """``importlib.import_module(name)``, or an ImportError that names the ``bench`` extra."""
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as e:
    raise ImportError(f"{name} is missing: the benchmarks need the 'bench' extra, "
                      "pip install -e '.[bench]'", name=e.name) from e


def package_version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
  """Hardware and software the numbers were taken on."""
  device = jax.devices()[0]
  total_ram = None
  try:
    with open("/proc/meminfo") as f:
      total_ram = int(f.readline().split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return dict(
      cpu_model=cpu_model(), cpu_count=os.cpu_count(),
      cpus_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      ram_bytes=total_ram, platform=platform.platform(), python=platform.python_version(),
      jax=jax.__version__, jaxlib=package_version("jaxlib"), flax=package_version("flax"),
      optax=package_version("optax"), evosax=package_version("evosax"),
      backend=jax.default_backend(), device_kind=device.device_kind,
      device_platform=device.platform, num_devices=jax.device_count(),
      threefry_partitionable=bool(jax.config.jax_threefry_partitionable))


def wait_for_idle(max_load: float, max_wait_s: float, poll_s: float = 30.0) -> dict[str, Any]:
  """Polls the 1-minute load average until it is below ``max_load`` (or time runs out)."""
  start = time.perf_counter()
  samples = [os.getloadavg()[0]]
  while samples[-1] >= max_load and time.perf_counter() - start + poll_s <= max_wait_s:
    log(f"load average {samples[-1]:.2f} >= {max_load}: waiting {poll_s:.0f} s ...")
    time.sleep(poll_s)
    samples.append(os.getloadavg()[0])
  return dict(max_load=max_load, waited_s=time.perf_counter() - start, samples=samples,
              reached=samples[-1] < max_load)


# --------------------------------------------------------------------------- formatting


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def megabytes(n: float | None) -> str:
  return "-" if n is None else f"{n / 2**20:,.0f}"


def human_bytes(n: float) -> str:
  for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
    if n >= scale:
      return f"{n / scale:.1f} {unit}"
  return f"{n / 2**10:.0f} KB"


def ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def largest_power_of_two_at_most(n: float) -> int:
  return 1 << max(0, int(math.floor(math.log2(max(n, 1)))))
