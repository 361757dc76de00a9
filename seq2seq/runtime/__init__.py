"""The runtime layer: what every other layer may lean on and none of them owns.

Device and bf16 choice, the torchrun world and its collectives, the allocator
setting that keeps training's memory flat, core counting, and the file-system
policy (outputs never clobber inputs; every file and directory is written beside
its target and renamed into place). It imports nothing else from the package
but ``seq2seq.config``.
"""
