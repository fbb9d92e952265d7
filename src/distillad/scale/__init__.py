"""Scale-out on existing engines: Ray for the benchmark grid and batch prediction, torchrun (DDP) for training.

- `ray_session`: start a local Ray or join a cluster, with one clear error when Ray is not installed.
- `ray_benchmark`: `distillad benchmark --engine ray`, one Ray task per train+test cell.
- `ray_predict`: `distillad predict --engine ray`, a Ray Data pipeline scoring in an actor pool.
- `ddp`: `distillad train --nproc N` / `torchrun -m distillad train`, data-parallel training.

Nothing here is imported by the single-machine paths: Ray is an optional extra (`pip install 'distillad[ray]'`),
and torch.distributed is only initialised under torchrun.
"""
