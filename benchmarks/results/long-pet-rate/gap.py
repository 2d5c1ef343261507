"""Centralized PEMMA-LoRA at the long budget (144 steps), one seed, from the long bench's CT backbone,
with group rate scales (--scale-map, replacing GROUP_LR_SCALES) and spec changes (--rank, --targets).
What closes the long-budget gap to early fusion (ctpet 0.666)? Run from the repository root:
    python benchmarks/results/long-pet-rate/gap.py --scale-map shared=0.5,ct=0.2,pet=2,fusion=2 --seed 1 \
        --backbone LONG_BENCH_OUT/backbones/unetr-small.safetensors --out OUT"""
import sys, json, time, argparse
from pathlib import Path
import torch
sys.path.insert(0, str(Path.cwd()))
import benchmarks.rows as rows
import pemma_core.model.pemma as pm
from benchmarks import cli as bench_cli
from benchmarks.config import config_from_args
from benchmarks.sites import load_test_batches, prepare_sites
from pemma_core.model.files import load_backbone

ap = argparse.ArgumentParser(); ap.add_argument('--scale-map', default='shared=0.5,ct=0.2'); ap.add_argument('--seed', type=int, default=0)
ap.add_argument('--rank', type=int, default=8); ap.add_argument('--alpha', type=int, default=0); ap.add_argument('--targets', default='')
ap.add_argument('--out', default='gap-out'); ap.add_argument('--backbone', required=True, help='the long bench CT backbone')
a = ap.parse_args()
MAP = {kv.split('=')[0]: float(kv.split('=')[1]) for kv in a.scale_map.split(',') if kv}
pm.PemmaModel.lr_scales = MAP
p = argparse.ArgumentParser(); bench_cli.add_arguments(p)
config = config_from_args(p.parse_args(['--out', a.out + '/bench', '--data-root', '../shared/data/ibsi-sts', '--backbones', 'unetr',
                                        '--threads', '1', '--budget', 'long', '--seeds', '1']))
torch.set_num_threads(1)
say = lambda t: print(time.strftime('%H:%M:%S'), t, flush=True)
sites = prepare_sites(config, say)
bench = rows.BackboneBench(config, sites, 'unetr', load_test_batches(sites.test), say)
bench.backbone, _ = load_backbone(Path(a.backbone))
change = {'rank': a.rank, 'alpha': a.alpha or 2 * a.rank}
if a.targets:
    change['targets'] = tuple(a.targets.split(','))
bench.spec = bench.spec.with_(**change)
plan = next(pl for pl in rows.PLANS if pl.row == 'pemma-lora')
say(f'lr scales {pm.PemmaModel.lr_scales}, spec {bench.spec}')
row = bench.run_row(plan, seed=a.seed)
name = f'gap-{a.scale_map}-r{a.rank}-{a.targets or "qkv,proj"}-s{a.seed}'
out = Path(a.out) / f'{name}.json'
out.write_text(json.dumps({'map': MAP, 'spec': str(bench.spec), 'seed': a.seed, 'dice': row['dice'], 'steps': row['steps'],
                           'trainable': row.get('trainable_params')}, indent=1))
say(f'{name}: {row["dice"]}')
