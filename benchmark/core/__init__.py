"""The foundation every other part of the harness stands on.

Data folders, loaders and views, checkpoint I/O, schedules, seeding, optimiser-group rules,
shared layers, errors, progress bars, interrupts and distributed helpers. Nothing here imports
from `methods/`, `tasks/`, `slurm/` or the application modules beside this package
(tests/test_layering.py checks it).
"""
