"""Does more PET capacity close the long-budget gap of PEMMA-LoRA ctpet to early fusion?

Centralized rows of the long bench (UNETR small, 144 steps), one CT backbone (trained here if its
file is missing, as `pemma bench --budget long` does), then each variant at each seed:
    ef           the early-fusion row (full fine-tuning), the reference
    lora         PEMMA-LoRA as it is (the pet LoRA on attention qkv + out_proj)
    pet-mlp      the pet LoRA also on the transformer MLPs (the shared LoRA unchanged)
    pet-decoder  the pet LoRA also on the 3x3x3 convs of decoder5..3 (peft Conv3d LoRA)
    pet-all-2x   the pet LoRA on the MLPs and decoder5..3, and the pet and fusion groups at twice the adapt rate
Only the pet adapter grows, so the CT mode's path is unchanged in every variant.
Run from the repository root:
    python benchmarks/results/long-pet-capacity/capacity.py --out OUT --variants lora,pet-decoder,ef --seeds 0
    python benchmarks/results/long-pet-capacity/capacity.py --out OUT --summary   # the table of what OUT holds
"""
import argparse, json, sys, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path.cwd()))
import benchmarks.rows as rows
import pemma_core.model.pemma as pm
from benchmarks import cli as bench_cli
from benchmarks.config import config_from_args
from benchmarks.sites import load_test_batches, prepare_sites
from pemma_core.model.files import load_backbone

EXTRA_PET_TARGETS = {
    "lora": None, "ef": None,
    "pet-mlp": r"mlp\.linear[12]",
    "pet-decoder": r"decoder[345]\.conv_block\.conv[12]\.conv",
    "pet-all-2x": r"mlp\.linear[12]|decoder[345]\.conv_block\.conv[12]\.conv",
}
# variants whose PET-reading groups also learn faster than the adapt rate (GROUP_LR_SCALES widened)
FASTER = {"pet-all-2x": {"pet": 2.0, "fusion": 2.0}}
ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--variants", default="lora,pet-decoder,ef,pet-mlp")
ap.add_argument("--seeds", default="0")
ap.add_argument("--summary", action="store_true", help="print the table of the runs in --out and stop")
a = ap.parse_args()
if a.summary:
    from benchmarks.targets import seed_case_bootstrap_ci
    runs = [json.loads(f.read_text()) for f in sorted(Path(a.out).glob("*-seed*.json"))]
    by = {}
    for r in runs:
        by.setdefault(r["variant"], {})[r["seed"]] = r
    ef = {s: r["row"]["per_case"]["ctpet"] for s, r in by.get("ef", {}).items()}
    print("| variant | trainable | seeds | ct | pet | ctpet | ctpet mean | ctpet - early fusion (points, seed x case 95% interval) |")
    print("|---|---|---|---|---|---|---|---|")
    for variant, seeds in by.items():
        order = sorted(seeds)
        cells = [" / ".join(f"{seeds[s]['dice'][m]:.3f}" for s in order) if m in seeds[order[0]]["dice"] else "-"
                 for m in ("ct", "pet", "ctpet")]
        mine = {s: seeds[s]["row"]["per_case"]["ctpet"] for s in order}
        both = sorted(set(mine) & set(ef))
        gap = "-"
        if variant != "ef" and both:
            diff = sum(seeds[s]["dice"]["ctpet"] - by["ef"][s]["dice"]["ctpet"] for s in both) / len(both)
            ci = seed_case_bootstrap_ci({s: mine[s] for s in both}, {s: ef[s] for s in both})
            gap = f"{100 * diff:+.1f} (seeds {', '.join(map(str, both))}; {ci[0]:+.1f} to {ci[1]:+.1f})"
        mean = sum(seeds[s]["dice"]["ctpet"] for s in order) / len(order)
        print(f"| {variant} | {seeds[order[0]]['trainable']:,} | {', '.join(map(str, order))} | " + " | ".join(cells)
              + f" | {mean:.3f} | {gap} |")
    sys.exit(0)
p = argparse.ArgumentParser(); bench_cli.add_arguments(p)
config = config_from_args(p.parse_args(["--out", a.out, "--data-root", "../shared/data/ibsi-sts", "--backbones", "unetr",
                                        "--threads", "1", "--budget", "long", "--seeds", "1"]))
torch.set_num_threads(1)
say = lambda t: print(time.strftime("%H:%M:%S"), t, flush=True)
sites = prepare_sites(config, say)
bench = rows.BackboneBench(config, sites, "unetr", load_test_batches(sites.test), say)
if bench.backbone_file.exists():
    bench.backbone, _ = load_backbone(bench.backbone_file)
    say(f"backbone reloaded from {bench.backbone_file}")
else:
    record = bench.train_backbone()
    (Path(a.out) / "backbone.json").write_text(json.dumps(record, indent=1, default=str))

inject = pm.inject_adapter_in_model


def growing(extra):
    """inject_adapter_in_model, with the pet adapter's targets widened by ``extra``."""
    def wrapped(config, model, adapter_name="default", **kw):
        if adapter_name == "pet" and extra:
            config = type(config)(**{**config.to_dict(), "target_modules": rf"(?:{config.target_modules})|(?:^(?:.*\.)?(?:{extra})$)"})
        return inject(config, model, adapter_name=adapter_name, **kw)
    return wrapped


for seed in [int(s) for s in a.seeds.split(",")]:
    for variant in a.variants.split(","):
        out = Path(a.out) / f"{variant}-seed{seed}.json"
        if out.exists():
            say(f"{out} exists: kept"); continue
        pm.inject_adapter_in_model = growing(EXTRA_PET_TARGETS[variant])
        pm.PemmaModel.lr_scales = {**pm.GROUP_LR_SCALES, **FASTER.get(variant, {})}
        plan = next(pl for pl in rows.PLANS if pl.row == ("early-fusion" if variant == "ef" else "pemma-lora"))
        t0 = time.time()
        row = bench.run_row(plan, seed=seed)
        out.write_text(json.dumps({"variant": variant, "seed": seed, "dice": row["dice"],
                                   "trainable": row.get("trainable_params"), "seconds": time.time() - t0,
                                   "row": row}, indent=1, default=str))
        say(f"{variant} seed {seed}: {row['dice']} trainable {row.get('trainable_params')}")
