"""Centralized PEMMA-LoRA at the long budget (144 steps), one seed, with PemmaModel.lr_scales set to
--scale-map (e.g. shared=0.5,ct=0.2), from the long bench's CT backbone. Run from the repository root:
    python benchmarks/results/long-lr-scales/scales.py --scale-map shared=0.5,ct=0.2 --seed 1
The seed-0 variants in seed0-variants.json ran an earlier form of it that patched AdamW instead."""
import sys, json, time, argparse
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import benchmarks.rows as rows
import pemma_core.model.pemma as pm
from benchmarks import cli as bench_cli
from benchmarks.config import config_from_args
from benchmarks.sites import load_test_batches, prepare_sites
from pemma_core.model.files import load_backbone

ap = argparse.ArgumentParser(); ap.add_argument('--scale-map', default=''); ap.add_argument('--seed', type=int, default=0)
ap.add_argument('--out', default='/tmp/pemma-lr-scales'); ap.add_argument('--backbone', required=True, help='the long bench CT backbone (OUT/backbones/unetr-small.safetensors)')
a = ap.parse_args()
MAP = {kv.split('=')[0]: float(kv.split('=')[1]) for kv in a.scale_map.split(',') if kv}
pm.PemmaModel.lr_scales = MAP
p = argparse.ArgumentParser(); bench_cli.add_arguments(p)
config = config_from_args(p.parse_args(['--out', a.out, '--data-root', '../shared/data/ibsi-sts', '--backbones', 'unetr',
                                        '--threads', '1', '--budget', 'long', '--seeds', '1']))
torch.set_num_threads(1)
say = lambda t: print(time.strftime('%H:%M:%S'), t, flush=True)
sites = prepare_sites(config, say)
bench = rows.BackboneBench(config, sites, 'unetr', load_test_batches(sites.test), say)
bench.backbone, _ = load_backbone(Path(a.backbone))
plan = next(pl for pl in rows.PLANS if pl.row == 'pemma-lora')
say(f'lr scales {pm.PemmaModel.lr_scales}')
row = bench.run_row(plan, seed=a.seed)
out = Path(a.out) / f'ctlr-{a.seed}-{a.scale_map}.json'
out.write_text(json.dumps({'map': MAP, 'seed': a.seed, 'dice': row['dice'], 'steps': row['steps']}, indent=1))
say(f'{MAP} seed {a.seed}: {row["dice"]}')
