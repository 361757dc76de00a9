"""The training layer: a run directory in, a saved bundle out.

``fit`` is the entry for every training (one model or a sequential ensemble);
``trainer`` runs the loop (teacher forcing, accumulation, DDP, budgets),
``rundir`` owns the run directory (lock, manifest, recovery after a crash) and
``snapshots`` keeps the weights that checkpoint averaging reads.
"""
