"""The long bench's federated PEMMA-LoRA row (6 rounds x 3 sites x 8 steps, exact rule, in-process engine: the
simulation engine's computation), one seed, from the long bench's CT backbone, on the tree it is run from:
    mkdir -p OUT/fed-fix-s1/backbones && cp LONG_BENCH_OUT/backbones/unetr-small.safetensors OUT/fed-fix-s1/backbones/
    python benchmarks/results/long-fed-outlier-fix/fed.py --seed 1 --label fix --out OUT"""
import sys, json, time, argparse
from pathlib import Path
import torch
sys.path.insert(0, str(Path.cwd()))
import benchmarks.rows as rows
from benchmarks import cli as bench_cli
from benchmarks.config import config_from_args
from benchmarks.federated import run_federated
from benchmarks.sites import load_test_batches, prepare_sites
from pemma_core.model.files import load_backbone

ap = argparse.ArgumentParser(); ap.add_argument('--seed', type=int, default=1); ap.add_argument('--label', default='fix')
ap.add_argument('--out', required=True); ap.add_argument('--backbone', required=True, help='the long bench CT backbone')
a = ap.parse_args()
p = argparse.ArgumentParser(); bench_cli.add_arguments(p)
config = config_from_args(p.parse_args(['--out', a.out + f'/fed-{a.label}-s{a.seed}', '--data-root', '../shared/data/ibsi-sts', '--backbones', 'unetr',
                                        '--threads', '1', '--budget', 'long', '--seeds', '1', '--fed-engine', 'inprocess']))
torch.set_num_threads(1)
say = lambda t: print(time.strftime('%H:%M:%S'), t, flush=True)
sites = prepare_sites(config, say)
bench = rows.BackboneBench(config, sites, 'unetr', load_test_batches(sites.test), say)
bench.backbone, _ = load_backbone(Path(a.backbone))
row = run_federated(bench, seed=a.seed)
m = json.load(open(Path(row['run_dir']) / 'metrics.json'))
rejected = [(r['round'], s['name'], s.get('reason', '')) for r in m['rounds'] for s in r['sites'] if s['status'] != 'ok']
out = Path(a.out) / f'fed-{a.label}-s{a.seed}.json'
out.write_text(json.dumps({'seed': a.seed, 'dice': row['dice'], 'per_round': [r.get('dice') for r in row['per_round']],
                           'rejected': rejected, 'run_dir': row['run_dir']}, indent=1))
say(f'fed {a.label} seed {a.seed}: {row["dice"]} rejected {rejected}')
