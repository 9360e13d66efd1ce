"""Reinforcement learning from the model's own samples (floor 5, beside engine and eval): rollouts from the
inference engine (`rollouts`), the rewards that score them (`rewards`), the round bookkeeping that makes a batch
source resumable (`rounds`), and the PPO and GRPO batch sources the RL stages hand to `Trainer.fit()` (`batches`)."""
