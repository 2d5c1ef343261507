"""The speed sections of ``BENCHMARKS.md``: PEMMA against full fine-tuning, the profile of
pemma's module swaps, threads, inference and data loading."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks.report_format import mib, param_count
from benchmarks.targets import MEMORY_TARGET, TIME_TARGET
from server.report import format_value

__all__ = ["inference_loading_section", "profiling_section", "speed_section", "threads_section"]


def speed_section(results: Mapping[str, Any]) -> list[str]:
    """PEMMA-LoRA against full fine-tuning: step time, FLOPs, memory, per backbone and preset."""
    config = results["config"]
    lines: list[str] = ["## Speed and memory: PEMMA-LoRA vs full fine-tuning", "",
              "Same backbone, same real CT+PET batch (batch "
              f"{config['batch_size']}, mode ctpet), each variant in a fresh Python process; full fine-tuning = the "
              "early-fusion model (the whole 2-channel backbone trained). Median of "
              f"{config['speed_steps']} timed step(s) after a warm-up step. Peak memory on CPU: the process's peak RSS "
              "during those steps (VmHWM, reset once the model is built) minus its RSS after building the model; "
              "on CUDA `max_memory_allocated`. Tensor peak: params + optimiser state + the profiler's peak bytes "
              "allocated in one step.", "",
              "| backbone | variant | trainable | s / step (wall) | CPU s / step | GFLOP / step | peak memory | tensor peak |",
              "|---|---|---|---|---|---|---|---|"]
    for name, entry in results.get("backbones", {}).items():
        for key in ("speed", "speed_paper"):
            speed = entry.get(key)
            if not speed:
                continue
            where = f"{name}, {speed['preset']} preset, batch {speed['batch_size']}" if key == "speed_paper" else name
            for variant, v in speed["variants"].items():
                lines.append(f"| {where} | {variant} | {param_count(v['trainable_params'])} | {v['seconds_per_step']:.2f} | "
                             f"{v['cpu_seconds_per_step']:.2f} | {v['flops_per_step'] / 1e9:.0f} | "
                             f"{mib(v['peak_memory_bytes'])} | {mib(v.get('tensor_peak_bytes'))} |")
            lines.append(f"| {where} | **ratio PEMMA / full** | | **{speed['time_ratio']:.3f}** | "
                         f"{speed['cpu_time_ratio']:.3f} | {speed['flops_ratio']:.3f} | **{speed['memory_ratio']:.3f}** | "
                         f"{format_value(speed.get('tensor_memory_ratio'))} |")
    lines += ["", f"Targets: time ratio <= {TIME_TARGET}, memory ratio <= {MEMORY_TARGET} (see Targets). The paper-preset "
              "pair (full runs, UNETR) uses an untrained backbone of the paper's size on one real 96^3 crop: time and "
              "memory do not depend on the weights. At the small preset the full-resolution decoder block, which every "
              "gradient must pass through, holds most of the saved activations in both variants; at the paper size the "
              "frozen weights' gradients and optimiser state, which PEMMA does not keep, weigh more.", ""]
    return lines


def profiling_section(results: Mapping[str, Any]) -> list[str]:
    """Profile before/after pemma's module swaps: step times and top operators."""
    lines: list[str] = ["## Profiling: the costs found and removed", "",
              "`torch.profiler` on one PEMMA-LoRA training step (mode ctpet), with MONAI's own modules (**before**) "
              "and with `pemma_core.model.monai_speed.speed_up_monai_modules` (**after**): (1) MONAI's InstanceNorm returns a view "
              "and its blocks then apply an in-place LeakyReLU and `out += residual` to it, so autograd copies whole "
              "activations twice in backward (`CopySlices`, `aten::copy_`/`clone`); the norm is now computed as "
              "`group_norm` with one group per channel (same maths, no view). (2) Swin UNETR's window attention ran "
              "`bmm` + softmax explicitly in training (MONAI uses `scaled_dot_product_attention` only without "
              "gradients); it now uses the fused kernel always, which also runs backward when the relative-position "
              "bias is frozen (PEMMA). Both are numerically equivalent (tests/test_bench.py checks the outputs). "
              "Step times below are interleaved before/after in one process.", "",
              "| backbone | variant | before s / step | after s / step | after / before (wall) | after / before (CPU) |",
              "|---|---|---|---|---|---|"]
    for name, entry in results.get("backbones", {}).items():
        prof = entry.get("profile", {})
        for variant in ("pemma-lora", "full-ft"):
            if variant in prof:
                p = prof[variant]
                lines.append(f"| {name} | {variant} | {p['before']['seconds_per_step']:.2f} | {p['after']['seconds_per_step']:.2f} | "
                             f"{p['time_ratio_after_before']:.3f} | {p['cpu_ratio_after_before']:.3f} |")
    lines.append("")
    for name, entry in results.get("backbones", {}).items():
        p = entry.get("profile", {}).get("pemma-lora")
        if not p or "top_ops" not in p["before"]:
            continue
        lines += [f"**{name}, PEMMA-LoRA step, top operators by self CPU time** (before: {p['before']['profiled_cpu_ms']:.0f} ms "
                  f"profiled, of which copies {p['before']['copy_ms']:.0f} ms and explicit attention "
                  f"{p['before']['explicit_attention_ms']:.0f} ms; after: {p['after']['profiled_cpu_ms']:.0f} ms, copies "
                  f"{p['after']['copy_ms']:.0f} ms, explicit attention {p['after']['explicit_attention_ms']:.0f} ms)", "",
                  "| before: op | ms | share | after: op | ms | share |", "|---|---|---|---|---|---|"]
        for b, a in zip(p["before"]["top_ops"][:8], p["after"]["top_ops"][:8]):
            lines.append(f"| `{b['op']}` | {b['self_ms']:.0f} | {100 * b['share']:.1f}% | `{a['op']}` | {a['self_ms']:.0f} | "
                         f"{100 * a['share']:.1f}% |")
        lines.append("")
    return lines


def threads_section(results: Mapping[str, Any]) -> list[str]:
    """One thread against all cores (CPU runs only)."""
    config = results["config"]
    lines: list[str] = []
    threads = results.get("threads")
    if threads:
        sps = threads["seconds_per_step"]
        cores = str(threads["cores"])
        faster = "1 thread" if sps["1"] < sps[cores] else f"{cores} threads"
        lines += [f"Intra-op threads, measured at the end of the run (load average {threads['load_average'][0]:.1f}): "
                  f"a PEMMA-LoRA step took {sps['1']:.2f} s with 1 thread and {sps[cores]:.2f} s with {cores}; "
                  f"{faster} won at that load. With other jobs on the cores, OpenMP threads of one process wait "
                  "on each other and a step can become several times slower than with one thread, which is why "
                  "the bench uses one thread when the machine is loaded when it starts "
                  f"(this run: {config.get('threads') or 'default'} thread(s), {config.get('threads_reason', '')}).", ""]
    return lines


def inference_loading_section(results: Mapping[str, Any]) -> list[str]:
    """Sliding-window inference of one case, and data loading times."""
    config = results["config"]
    lines: list[str] = ["## Inference and data loading", ""]
    for name, entry in results.get("backbones", {}).items():
        inf = entry.get("inference")
        if inf:
            lines.append(
                f"- {name}: sliding-window inference of {inf['case_id']} (largest test case, grid {tuple(inf['grid_shape'])}, "
                f"{inf['windows_overlap_0.25']} windows of {inf['roi']}^3 at overlap 0.25, {inf['windows_overlap_0']} at 0), "
                f"PEMMA-LoRA ctpet: **{inf['seconds_after']:.2f} s** ({inf['seconds_before']:.2f} s with MONAI's modules, "
                f"ratio {inf['seconds_after'] / inf['seconds_before']:.3f}); overlap 0: {inf['seconds_after_overlap_0']:.2f} s. "
                "On these crops overlap 0.25 adds few windows, so the default stays."
            )
    loading = results.get("loading")
    if loading:
        lines.append(
            f"- Data loading ({loading['n_cases']} CT+PET cases, `measure_loading`): {loading['first_load_s_per_case']:.2f} s "
            f"per case cold (read, resample both grids, normalise, cache), **{loading['cached_load_s_per_case']:.3f} s per "
            f"case cached** ({loading['speedup']}x); a training batch (random crop + flips + affine of "
            f"{config['batch_size']} cases) {loading['train_batch_seconds']:.3f} s."
        )
    lines.append("")
    return lines
