"""GRPO reinforcement learning: rewards (on device), the optional LLM judge, the training step."""
