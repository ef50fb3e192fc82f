"""Cluster layer: a grid as N independent launches (SLURM job array or local jobs) through
submitit, requeued on preemption or time limit, and the status of a results directory.

It sits above the engine, beside the CLI: a task runs ``accelerate launch run_bench.py ...
--shard K/N`` as a subprocess, so nothing here trains or imports torch.
"""
