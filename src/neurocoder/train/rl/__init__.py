"""Reinforcement learning: vectorised environments and the PPO agent."""
