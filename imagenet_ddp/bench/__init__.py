"""Benchmarks: each runs its baseline in the same process and prints the ratio.

python -m imagenet_ddp.bench shards      # make_shards vs GNU tar
python -m imagenet_ddp.bench loaders     # DALI / torch loaders vs ImageFolder + PIL
"""
