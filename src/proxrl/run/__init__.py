"""What a run of any stage needs — gym training, the ladder, SFT, the reward model, RL on tokens.

=================  ==========================================================================
``rundir``         the run directory: ``config.json``, ``metrics.jsonl`` (cut back on resume), ``samples.md``
``checkpoint``     atomic safetensors + JSON checkpoints, rotation, validation (no pickle)
``state``          optimizer and RNG state in checkpoint form; seeding
``signals``        SIGINT/SIGTERM → finish the update, checkpoint, exit 130/143
``guards``         NaN/inf checks naming the quantity and the update; skip-and-restore backups
``sgd``            the epochs × minibatches optimizer loop (gradient clip, finite check, step)
``progress``       console progress on stderr (a bar on a terminal, plain lines otherwise) and TensorBoard
``optim``          the one Adam constructor
``plot``           curves of metrics.jsonl files
=================  ==========================================================================

Nothing here imports :mod:`proxrl.gym` or :mod:`proxrl.lm`; both import this package and the math.
"""
