"""Dispatching `bench run` jobs through submitit: to SLURM, or to a local background process."""
