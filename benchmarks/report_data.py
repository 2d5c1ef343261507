"""The data and closing sections of ``BENCHMARKS.md``: real data quirks, failed phases, GPU."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["data_quirks_section", "errors_section", "gpu_section"]


def data_quirks_section(results: Mapping[str, Any]) -> list[str]:
    """Usable and skipped cases, the data layer's warnings, the PET/CT alignment audit."""
    lines: list[str] = []
    data = results["data"]
    lines += ["## Real data quirks and what the pipeline does with them", ""]
    lines += [f"Usable cases: " + ", ".join(f"{k} {v}" for k, v in data["counts"].items()) + "."]
    if data["skipped"]:
        lines += ["", "Cases left out by the checks (`on_bad_case: skip`):", ""]
        lines += [f"- {s['site']}: {s['case_id']}: {s['problem']}" for s in data["skipped"]]
    else:
        lines.append("No case was left out by the checks.")
    lines += ["", f"Warnings the data layer emitted (`site_cases` / `inspect_case`), {len(data['warnings'])}:", ""]
    lines += [f"- {w['site']}: {w['message']}" for w in data["warnings"]] or ["- none"]
    audit = data.get("alignment", [])
    if audit:
        low = [a for a in audit if a["pet_mask_vs_ct_mask_dice"] < 0.8]
        lines += ["", "Alignment audit: PET_mask carried onto the CT-derived grid by the pipeline's own transform "
                  "(through both headers) against CT_mask on that grid. The pipeline trusts the headers and keeps "
                  "every case; a low Dice means the PET it trains on is shifted against the label.", "",
                  "| site | case | PET used | CT slices | PET slices | PET - CT z origin (mm) | PET_mask vs CT_mask Dice |",
                  "|---|---|---|---|---|---|---|"]
        for a in audit:
            lines.append(f"| {a['site']} | {a['case_id']} | {'yes' if a['pet_used'] else 'no (CT-only site)'} | {a['ct_slices']} | "
                         f"{a['pet_slices']} | {a['z_origin_offset_mm']:+.2f} | {a['pet_mask_vs_ct_mask_dice']:.3f} |")
        others = [a["pet_mask_vs_ct_mask_dice"] for a in audit if a not in low]
        low_text = ", ".join("%s (%.2f, %s)" % (a["case_id"], a["pet_mask_vs_ct_mask_dice"], a["site"]) for a in low)
        warned = [a["case_id"] for a in low if any(f"case {a['case_id']}:" in w["message"] for w in data["warnings"])]
        lines += ["", (f"Below 0.8: {low_text}; the others {min(others):.2f}-{max(others):.2f}. " if low and others else "")
                  + "No check detects a header shift as such (that needs the masks); "
                  + (f"{', '.join(warned)} only shows up indirectly, as part of its CT lying outside the PET field of "
                     "view (warning above). " if warned else "")
                  + "Such a case is kept and trained on with its PET shifted against its label; partial PET coverage "
                  "is only warned about (PET reads 0 outside its field of view), and a CT-only site never reads its PET."]
    lines.append("")
    return lines


def errors_section(results: Mapping[str, Any]) -> list[str]:
    """Phases of the run that raised."""
    lines: list[str] = []
    if results.get("errors"):
        lines += ["## Phases that failed", "", "These parts of the run raised; their numbers are missing above.", ""]
        lines += [f"- {e['phase']}: `{e['error'][:300]}`" for e in results["errors"]]
        lines.append("")
    return lines


def gpu_section(results: Mapping[str, Any]) -> list[str]:
    """What ``--device cuda`` runs, and whether this run used it."""
    env = results["environment"]
    lines: list[str] = ["## GPU (`--device cuda`)", "",
              "`pemma bench --device cuda --preset paper` runs the same suite on a GPU: training and inference under "
              "bf16 autocast (`pemma_core.training.local.autocast`), peak memory from `torch.cuda.max_memory_allocated`, the "
              "federated sites' YAMLs written with `device: cuda`. On a machine without CUDA it stops with a clear "
              "error before doing anything. "
              + ("This run used CUDA." if env.get("cuda_device") else
                 "**Not run here**: this machine has no GPU, so no GPU numbers exist yet; budgets for `paper` can be "
                 "raised with `--pretrain-steps/--fed-rounds/--fed-local-steps`."), ""]
    return lines
