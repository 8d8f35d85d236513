"""The ladder on Gymnasium environments: envs, policy, rollout → Batch, update rules, the training loop,
presets and the ladder command. ``proxrl.train/load/evaluate`` are its public face; nothing here imports
:mod:`proxrl.lm`."""
