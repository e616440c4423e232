"""Markdown tables, target verdicts and plots from the result rows of ``benchmarks.run``.

Rows are plain dicts (they go to the JSON as they are); see ``benchmarks.run``
for their fields. Plots use matplotlib's object API (``Figure``), no pyplot
global state.
"""

from __future__ import annotations

import statistics
from typing import Any, Iterable

from benchmarks import common
from benchmarks.forward import METHODS

Row = dict[str, Any]
FAST_TARGET = 0.9  # fast path / plain inference throughput at N >= 128 (EGGROLL: 91% on GPUs)
FULL_RANK_TARGET = 100.0  # fast path speed-up over full-rank ES at N = 512, largest model
MEMORY_TARGET = 1.25  # fast path peak memory / plain inference at the same batch
REAL_DECODE_TARGET = 0.9  # population decode / plain decode, real SmolLM2-135M, N >= 16
REAL_DECODE_TARGET_MIN_N = 16
COMPILE_TARGET_S = 10.0  # noise and update programs at the deepest depth of part e
COMPILE_FLAT_TARGET = 2.0  # slowest / fastest compile over part e's depths
FIRST_ITERATION_TARGET_S = 60.0  # first whole ES iteration of the real model, compiles included
# Below this, plain's measured peak is within the allocator's noise (a few MB of heap reuse).
MEMORY_TARGET_MIN_BYTES = 64 * 2**20
STYLE = {"plain": ("k", "o"), "fast r=1": ("tab:blue", "s"), "fast r=4": ("tab:cyan", "D"),
         "full-rank": ("tab:red", "v"), "evosax OpenES": ("tab:orange", "^")}


def select(rows: Iterable[Row], **where) -> list[Row]:
  return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


def find(rows: Iterable[Row], **where) -> Row | None:
  found = select(rows, **where)
  return found[0] if found else None


def ran(row: Row | None) -> bool:
  return row is not None and row["status"] == "ok"


def fmt_ratio(x: float | None, digits: int = 2, estimated: bool = False) -> str:
  if x is None:
    return "-"
  text = f"{x:,.{digits}f}x"
  return f"~{text} (est.)" if estimated else text


def fmt_ms(seconds: float | None) -> str:
  if seconds is None:
    return "-"
  return f"{seconds * 1e3:,.0f}" if seconds >= 0.1 else f"{seconds * 1e3:,.1f}"


def memory_cells(row: Row) -> tuple[str, str]:
  """(measured peak MB, XLA MB) of a row; an estimate for a skipped one."""
  if row["status"] != "ok":
    est = row.get("est_bytes")
    return ("-" if est is None else f"~{common.human_bytes(est)} (est.)"), "-"
  return common.megabytes(row["peak_bytes"]), common.megabytes(row.get("xla_bytes"))


# --------------------------------------------------------------------------- tables


def forward_table(rows: list[Row]) -> str:
  body = []
  for r in select(rows, section="forward"):
    measured, xla = memory_cells(r)
    estimated = r["status"] != "ok"
    if estimated:
      speed = "skipped"
      run = f"~{r['est_s']:,.0f} s (est.)" if r.get("est_s") else "-"
    else:
      speed = f"{r['throughput']:,.0f}"
      run = f"{fmt_ms(r['median_s'])} ({len(r['times_s'])})"
    body.append([
        r["model"], r["population"], r["method"], speed,
        fmt_ratio(r.get("vs_plain"), 3 if (r.get("vs_plain") or 1) < 0.1 else 2, estimated),
        fmt_ratio(r.get("fast_speedup"), 1, estimated) if r["method"] != "fast r=1" else "-",
        run, "-" if r.get("compile_s") is None else f"{r['lower_s'] + r['compile_s']:.1f}",
        measured, xla, fmt_ratio(r.get("mem_vs_plain")), r.get("reason") or ""])
  headers = ["model", "N", "method", "member-tokens/s", "vs plain", "fast r=1 speed-up",
             "run ms (repeats)", "compile s", "peak MB", "XLA MB", "mem vs plain", "note"]
  return common.markdown_table(headers, body)


def profile_table(rows: list[Row]) -> str:
  body = []
  for r in select(rows, section="profile"):
    fast = find(rows, section="forward", model=r["model"], population=r["population"],
                method="fast r=1")
    share = r["median_s"] / fast["median_s"] if ran(fast) else None
    rate = f"{r['normals'] / r['median_s'] / 1e6:,.0f}" if r.get("normals") else "-"
    vs_plain = fmt_ratio(r.get("vs_plain")) if r["method"].startswith("fast") else "-"
    body.append([r["model"], r["population"], r["method"], fmt_ms(r["median_s"]),
                 "-" if share is None else f"{share:.0%}", vs_plain, rate,
                 f"{r['lower_s'] + r['compile_s']:.1f}"])
  headers = ["model", "N", "variant", "run ms", "of fast r=1 time", "vs plain", "M normals/s",
             "compile s"]
  return common.markdown_table(headers, body)


def iteration_table(rows: list[Row]) -> str:
  body = []
  for r in select(rows, section="iteration"):
    measured, xla = memory_cells(r)
    body.append([
        r["model"], r["population"], r["method"], f"{fmt_ms(r['median_s'])} ({len(r['times_s'])})",
        f"{r['throughput']:,.0f}", fmt_ratio(r.get("vs_plain")),
        fmt_ratio(r.get("es_jax_speedup"), 1), f"{r['lower_s'] + r['compile_s']:.1f}",
        measured, xla])
  headers = ["model", "N", "method", "ms / iteration (repeats)", "generated tok/s",
             "vs plain decode", "es_jax iteration speed-up", "compile s", "peak MB", "XLA MB"]
  return common.markdown_table(headers, body)


def awd_table(rows: list[Row]) -> str:
  body = []
  for without, with_awd in awd_pairs(rows):
    share = awd_share(without, with_awd)
    body.append([with_awd["model"], with_awd["population"], with_awd["section"],
                 without["method"], fmt_ms(without["median_s"]), fmt_ms(with_awd["median_s"]),
                 f"{share:+.1%}"])
  headers = ["model", "N", "section", "step", "ms without AWD", "ms with AWD", "AWD share of step"]
  return common.markdown_table(headers, body)


def awd_pairs(rows: list[Row]) -> list[tuple[Row, Row]]:
  pairs = []
  for r in rows:
    if r["method"].endswith(" + AWD") and ran(r):
      base = find(rows, section=r["section"], model=r["model"], population=r["population"],
                  method=r["method"].removesuffix(" + AWD"))
      if ran(base):
        pairs.append((base, r))
  return pairs


def awd_share(without: Row, with_awd: Row) -> float:
  """(with - without) / with, from the rounds both ran (paired)."""
  pairs = list(zip(without["times_s"], with_awd["times_s"]))
  return statistics.median((w - wo) / w for wo, w in pairs)


def real_table(rows: list[Row]) -> str:
  """Part f's steady-state rows: decode speeds and seconds per ES iteration."""
  body = []
  for r in select(rows, section="real"):
    if r["method"] == "first ES iteration":
      continue
    measured, xla = memory_cells(r)
    body.append([
        r["model"], r["weights"], r["dtype"], r.get("layout", "unrolled"), r["population"],
        r["method"],
        f"{r['throughput']:,.0f}", fmt_ratio(r.get("vs_plain")),
        f"{r['median_s']:,.2f} ({len(r['times_s'])})", f"{r['lower_s'] + r['compile_s']:.1f}",
        measured, xla, fmt_ratio(r.get("mem_vs_plain"))])
  headers = ["model", "weights", "dtype", "layout", "N", "method", "generated tok/s",
             "vs plain decode",
             "s / call (repeats)", "compile s", "peak MB", "XLA MB", "mem vs plain"]
  return common.markdown_table(headers, body)


def real_first_iteration_table(rows: list[Row]) -> str:
  """Part f's first ES iteration in a fresh process: wall time and each program's compile."""
  body = []
  for r in select(rows, section="real", method="first ES iteration"):
    pieces = [f"{r[f'{p}_lower_s'] + r[f'{p}_compile_s']:.1f} / {r[f'{p}_run_s']:.1f}"
              for p in ("noise", "decode", "update")]
    body.append([r["model"], r["dtype"], r.get("layout", "unrolled"), r["population"],
                 f"{r['wall_s']:.1f}", *pieces,
                 f"{r['reward_s']:.2f}", f"{r['load_s']:.1f}"])
  headers = ["model", "dtype", "layout", "N", "first iteration s (all compiles)",
             "noise compile / run s", "decode compile / run s", "update compile / run s",
             "host reward s", "weights load s (not included)"]
  return common.markdown_table(headers, body)


# --------------------------------------------------------------------------- targets


def targets(rows: list[Row]) -> list[dict[str, Any]]:
  """Each target with the measured value(s), met / missed and by how much."""
  out = []
  forward = select(rows, section="forward")
  models = list(dict.fromkeys(r["model"] for r in forward))
  for rank in (1, 4):
    cells = [r for r in forward if r["method"] == f"fast r={rank}" and r["population"] >= 128
             and ran(r) and r.get("vs_plain") is not None]
    if cells:
      worst = min(cells, key=lambda r: r["vs_plain"])
      values = ", ".join(f"{r['model']} N={r['population']}: {r['vs_plain']:.2f}x" for r in cells)
      out.append(dict(
          target=f"fast r={rank} >= {FAST_TARGET}x plain inference at N >= 128",
          measured=values, met=worst["vs_plain"] >= FAST_TARGET,
          gap=f"worst {worst['vs_plain']:.2f}x ({worst['model']} N={worst['population']}), "
              f"{FAST_TARGET - worst['vs_plain']:+.2f} to go" if worst["vs_plain"] < FAST_TARGET
              else "met everywhere"))
  if models:
    largest = models[-1]
    full = find(forward, model=largest, population=512, method="full-rank")
    if full is not None and full.get("fast_speedup") is not None:
      speedup = full["fast_speedup"]
      how = "measured" if ran(full) else "estimated: full-rank not run, see its note"
      out.append(dict(
          target=f"fast r=1 >= {FULL_RANK_TARGET:.0f}x faster than full-rank ES at N=512, "
                 f"{largest}",
          measured=f"{speedup:.1f}x ({how})", met=speedup >= FULL_RANK_TARGET,
          gap="met" if speedup >= FULL_RANK_TARGET
              else f"{FULL_RANK_TARGET / speedup:.1f}x short"))
  cells = [r for r in forward if r["method"].startswith("fast") and ran(r)
           and r.get("mem_vs_plain") is not None
           and r["peak_bytes"] / r["mem_vs_plain"] >= MEMORY_TARGET_MIN_BYTES]
  if cells:
    worst = max(cells, key=lambda r: r["mem_vs_plain"])
    out.append(dict(
        target=f"fast path peak memory <= {MEMORY_TARGET}x plain inference (same batch; cells "
               f"where plain peaks at >= {MEMORY_TARGET_MIN_BYTES // 2**20} MB)",
        measured=f"worst {worst['mem_vs_plain']:.2f}x ({worst['method']}, {worst['model']} "
                 f"N={worst['population']})",
        met=worst["mem_vs_plain"] <= MEMORY_TARGET,
        gap="met" if worst["mem_vs_plain"] <= MEMORY_TARGET
            else f"{worst['mem_vs_plain'] - MEMORY_TARGET:+.2f}x over"))
  return out + compile_targets(rows) + real_targets(rows)


def compile_targets(rows: list[Row]) -> list[dict[str, Any]]:
  """Part e's targets per layout: both programs <= 10 s at the deepest depth, flat within 2x."""
  out = []
  compiled = select(rows, section="compile")
  for layout in dict.fromkeys(r.get("layout", "unrolled") for r in compiled):
    cells = sorted((r for r in compiled if r.get("layout", "unrolled") == layout),
                   key=lambda r: r["layers"])
    deepest = cells[-1]
    seconds = {p: [r[f"{p}_compile_s"] for r in cells] for p in ("noise", "update")}
    worst = max(seconds["noise"][-1], seconds["update"][-1])
    out.append(dict(
        target=f"noise and update compile <= {COMPILE_TARGET_S:.0f} s at {deepest['layers']} "
               f"layers ({layout})",
        measured=f"noise {seconds['noise'][-1]:.1f} s, update {seconds['update'][-1]:.1f} s",
        met=worst <= COMPILE_TARGET_S,
        gap="met" if worst <= COMPILE_TARGET_S else f"{worst - COMPILE_TARGET_S:+.1f} s over"))
    spread = max(max(s) / min(s) for s in seconds.values())
    out.append(dict(
        target=f"compile flat within {COMPILE_FLAT_TARGET:.0f}x over "
               f"{', '.join(str(r['layers']) for r in cells)} layers ({layout})",
        measured=", ".join(f"{p} {' / '.join(f'{x:.1f}' for x in s)} s"
                           for p, s in seconds.items()),
        met=spread <= COMPILE_FLAT_TARGET,
        gap="met" if spread <= COMPILE_FLAT_TARGET else f"{spread:.1f}x from fastest to slowest"))
  return out


def real_targets(rows: list[Row]) -> list[dict[str, Any]]:
  """Part f's targets: population decode speed and the first iteration's wall time."""
  out = []
  cells = [r for r in select(rows, section="real", method="population decode")
           if ran(r) and r["population"] >= REAL_DECODE_TARGET_MIN_N]
  if cells:
    worst = min(cells, key=lambda r: r["vs_plain"])
    out.append(dict(
        target=f"population decode >= {REAL_DECODE_TARGET}x plain decode, {worst['model']}, "
               f"N >= {REAL_DECODE_TARGET_MIN_N}",
        measured=", ".join(f"N={r['population']} {r['dtype']} {r.get('layout', 'unrolled')}: "
                           f"{r['vs_plain']:.2f}x" for r in cells),
        met=worst["vs_plain"] >= REAL_DECODE_TARGET,
        gap="met" if worst["vs_plain"] >= REAL_DECODE_TARGET
            else f"worst {worst['vs_plain']:.2f}x (N={worst['population']}), "
                 f"{REAL_DECODE_TARGET - worst['vs_plain']:+.2f} to go"))
  for r in select(rows, section="real", method="first ES iteration"):
    out.append(dict(
        target=f"first whole ES iteration of {r['model']} (noise, population decode, update), "
               f"compiles included, < {FIRST_ITERATION_TARGET_S:.0f} s",
        measured=f"{r['wall_s']:.1f} s (N={r['population']}, {r['dtype']}, "
                 f"{r.get('layout', 'unrolled')}, of which "
                 f"{r['lower_s'] + r['compile_s']:.1f} s lowering and compiling)",
        met=r["wall_s"] < FIRST_ITERATION_TARGET_S,
        gap="met" if r["wall_s"] < FIRST_ITERATION_TARGET_S
            else f"{r['wall_s'] - FIRST_ITERATION_TARGET_S:+.1f} s over"))
  return out


def targets_table(items: list[dict[str, Any]]) -> str:
  return common.markdown_table(
      ["target", "measured", "verdict"],
      [[t["target"], t["measured"], ("met" if t["met"] else "MISSED: ") + ("" if t["met"]
                                                                             else t["gap"])]
       for t in items])


def explanations(rows: list[Row]) -> str:
  """Why the targets are missed, from the profile rows (Markdown bullets)."""
  lines = []
  for profile in select(rows, section="profile", method="fast r=1, noise given"):
    cell = dict(model=profile["model"], population=profile["population"])
    fast, plain = find(rows, section="forward", method="fast r=1", **cell), find(
        rows, section="forward", method="plain", **cell)
    draw = find(rows, section="profile", method="noise draw r=1 (es_jax)", **cell)
    fenced = find(rows, section="profile", method="fast r=1, draw fenced (lax.cond)", **cell)
    if not all(ran(r) for r in (fast, plain, draw, fenced)):
      continue
    extra = fast["median_s"] - profile["median_s"]
    lines.append(
        f"- Fast path vs plain at {cell['model']}, N={cell['population']}: fast r=1 "
        f"{fmt_ms(fast['median_s'])} ms ({fast['vs_plain']:.2f}x plain). With the noise drawn "
        f"beforehand the same forward takes {fmt_ms(profile['median_s'])} ms "
        f"({profile['vs_plain']:.2f}x plain), and drawing it alone takes "
        f"{fmt_ms(draw['median_s'])} ms. " + (
            f"Yet drawing it inside the forward adds {fmt_ms(extra)} ms "
            f"({extra / draw['median_s']:.1f}x the draw alone). Cause: XLA:CPU fuses the "
            "erf-inverse step of the normal sampler into the elementwise fusions that consume "
            "the factor b of (x a) b^T, recomputing it for every token and sign."
            if extra > draw["median_s"] else
            "Drawing it inside the forward costs no more than that here (difference "
            f"{fmt_ms(extra)} ms): the gap is applying the low-rank terms.") +
        " With the draw behind a fusion boundary (a lax.cond, so the factors are materialised "
        f"once) the fast path takes {fmt_ms(fenced['median_s'])} ms "
        f"({fenced['vs_plain']:.2f}x plain).")
  forward = select(rows, section="forward")
  models = list(dict.fromkeys(r["model"] for r in forward))
  if models:
    full = find(forward, model=models[-1], population=512, method="full-rank")
    fast = find(forward, model=models[-1], population=512, method="fast r=1")
    # The best sampling rate seen by any draw of the profile: a lower bound on the draw's time.
    rates = [r["normals"] / r["median_s"] for r in select(rows, section="profile")
             if ran(r) and r.get("normals")]
    if full is not None and ran(fast) and (ran(full) or full.get("est_s")):
      seconds = full["median_s"] if ran(full) else full["est_s"]
      normals = full["perturbed"] // 2  # one full-rank draw per antithetic pair
      per_member_fast = fast["median_s"] / 512
      text = (f"- Full-rank ES at {models[-1]}, N=512: {seconds / 512 * 1e3:,.0f} ms per member "
              f"vs the fast path's {per_member_fast * 1e3:,.1f} ms. A full-rank member needs "
              f"{normals / 1e6:.1f}M fresh normals (one draw per antithetic pair) and a pass "
              "over its own copy of the weights; the fast path's member shares the weight GEMM "
              f"and costs ~2 x T = {2 * fast['tokens']} flops per weight.")
      if rates:
        normals_per_s = max(rates)
        text += (f" At the best sampling rate measured here, {normals_per_s / 1e6:.0f}M "
                 "normals/s, the draw alone "
                 f"takes {normals / normals_per_s * 1e3:,.0f} ms per member, "
                 f"{normals / normals_per_s / per_member_fast:.0f}x the fast path's whole "
                 "member: on a 2-core CPU sampling is expensive relative to GEMM flops, which "
                 "caps the ratio at a few tens for T=16 (it grows as 1/T). The EGGROLL ~100x is "
                 "a GPU figure, where the shared GEMM runs on tensor cores.")
      lines.append(text)
  fast_cells = [r for r in forward if r["method"].startswith("fast") and ran(r)
                and r.get("mem_vs_plain", 0) > MEMORY_TARGET
                and r["peak_bytes"] / r["mem_vs_plain"] >= MEMORY_TARGET_MIN_BYTES]
  for r in fast_cells:
    plain = find(forward, model=r["model"], population=r["population"], method="plain")
    lines.append(
        f"- Memory of {r['method']} at {r['model']}, N={r['population']}: "
        f"{common.megabytes(r['peak_bytes'])} MB vs plain's "
        f"{common.megabytes(plain['peak_bytes'])} MB. All pairs' noise factors "
        f"({common.megabytes(r.get('noise_bytes'))} MB) and the separate low-rank products are "
        "live beside activations that are small at T=16 tokens per member; chunking the "
        "population (es_step's chunk_size) bounds both.")
  if not lines:
    return ""
  return "Why:\n\n" + "\n".join(lines)


# --------------------------------------------------------------------------- plots


PANELS = {"throughput": "member-tokens / s", "ratio": "throughput / plain inference"}


def forward_figure(rows: list[Row], panels: tuple[str, ...] = ("throughput", "ratio")):
  """One row of panels per entry of ``panels``, one column per model, x = population N."""
  # Object API: no pyplot global state.
  Figure = common.import_bench_dependency("matplotlib.figure").Figure  # noqa: N806

  forward = select(rows, section="forward")
  models = list(dict.fromkeys(r["model"] for r in forward))
  fig = Figure(figsize=(4.2 * max(1, len(models)), 0.6 + 3.5 * len(panels)), layout="constrained")
  axes = fig.subplots(len(panels), max(1, len(models)), squeeze=False)
  for column, model in enumerate(models):
    for panel, ax in zip(panels, (axes[i][column] for i in range(len(panels)))):
      for method in METHODS:
        _plot_method(ax, select(forward, model=model, method=method), method, panel)
      ax.set_title(f"{model} params, T={forward[0]['tokens']} tokens/member", fontsize=10)
      ax.set_ylabel(PANELS[panel])
      if panel == "ratio":
        ax.axhline(FAST_TARGET, color="gray", linestyle=":", linewidth=1)
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("population N")
      ax.grid(True, which="both", alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.suptitle("Population forward of the Qwen2 port (dashed, hollow: estimated, not run)")
  return fig


def _plot_method(ax, cells: list[Row], method: str, panel: str) -> None:
  """Measured points as a line; time-skipped cells (estimated) dashed with hollow markers."""
  color, marker = STYLE[method]
  cells = sorted(cells, key=lambda r: r["population"])
  value = (lambda r: r["throughput"] if ran(r) else r["population"] * r["tokens"] / r["est_s"]) \
      if panel == "throughput" else (lambda r: r["vs_plain"])
  measured = [r for r in cells if ran(r)]
  estimated = [r for r in cells if not ran(r) and r.get("est_s") and r.get("vs_plain")]
  if measured:
    ax.plot([r["population"] for r in measured], [value(r) for r in measured], color=color,
            marker=marker, label=method)
  if estimated:
    joined = measured[-1:] + estimated
    ax.plot([r["population"] for r in joined], [value(r) for r in joined], color=color,
            marker=marker, linestyle="--", markerfacecolor="none")


def save_figures(rows: list[Row], out_dir: str) -> list[str]:
  """benchmarks.png (both panels), throughput.png and ratio_to_inference.png."""
  import os

  paths = []
  for name, panels in (("benchmarks.png", ("throughput", "ratio")),
                       ("throughput.png", ("throughput",)),
                       ("ratio_to_inference.png", ("ratio",))):
    path = os.path.join(out_dir, name)
    forward_figure(rows, panels).savefig(path, dpi=110)
    paths.append(path)
  return paths
