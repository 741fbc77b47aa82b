"""Vectorised environments for the actor-critic agent, all with one interface.

``make_vector_env(name, num_envs, seed)`` understands:

* ``minatar:GAME`` (breakout, space_invaders, freeway, asterix, seaquest): MinAtar's 10x10xC
  boolean frames as (C, 10, 10) floats, sticky actions 0.1 and difficulty ramping as the
  MinAtar defaults, the game's minimal action set. Its state pickles, so a resumed run continues
  the very episodes it left.
* ``atari:GAME`` (pong, breakout, ...): ALE through ``ale_py.vector_env.AtariVectorEnv`` with the
  standard preprocessing (frame skip 4 with max-pooling, grey 84x84, stack of 4, up to 30 no-op
  starts, fire reset); rewards are clipped to their sign for learning only, returns are reported
  unclipped. A resumed run re-seeds and starts new episodes.
* any other gymnasium id with discrete actions (``CartPole-v1``, ...): vector or image
  observations through ``gymnasium.vector.SyncVectorEnv``; re-seeded on resume as Atari.

``step(actions)`` returns (observations, rewards, dones, finished) where ``finished`` lists the
(return, length) of the episodes that ended in this step; finished environments are reset in the
same step (the returned observation is the new episode's first).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["make_vector_env", "MINATAR_GAMES", "VectorEnv"]

MINATAR_GAMES = ("breakout", "space_invaders", "freeway", "asterix", "seaquest")


class VectorEnv:
    """The interface; subclasses keep per-environment running returns and lengths."""

    observation_shape: tuple[int, ...]
    num_actions: int
    frames_per_step: int = 1           # emulator frames per agent step (Atari: the frame skip)
    resumable_state: bool = False      # True: state() / load_state() restore the running episodes

    def reset(self) -> torch.Tensor:
        raise NotImplementedError

    def step(self, actions: np.ndarray):
        raise NotImplementedError

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass

    def _account(self, rewards: np.ndarray, dones: np.ndarray) -> list[tuple[float, int]]:
        """Add a step's rewards to the running episodes; return and restart those that ended."""
        self.returns += rewards
        self.lengths += 1
        finished = []
        for index in np.nonzero(dones)[0]:
            finished.append((float(self.returns[index]), int(self.lengths[index])))
            self.returns[index], self.lengths[index] = 0, 0
        return finished


class MinAtarVector(VectorEnv):
    resumable_state = True

    def __init__(self, game: str, num_envs: int, seed: int) -> None:
        try:
            from minatar import Environment
        except ImportError as error:
            raise ImportError("MinAtar is not installed: pip install 'neurocoder[rl]' (make setup installs it)") from error
        if game not in MINATAR_GAMES:
            raise ValueError(f"unknown MinAtar game {game!r}; choose one of {MINATAR_GAMES}")
        self.envs = []
        for index in range(num_envs):
            env = Environment(game)
            env.seed(seed * 1000 + index)
            self.envs.append(env)
        self.actions = self.envs[0].minimal_action_set()
        self.num_actions = len(self.actions)
        rows, cols, channels = self.envs[0].state_shape()
        self.observation_shape = (channels, rows, cols)
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, dtype=np.int64)

    def _observe(self) -> torch.Tensor:
        frames = np.stack([env.state() for env in self.envs]).astype(np.float32)   # (N, 10, 10, C)
        return torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()

    def reset(self) -> torch.Tensor:
        for env in self.envs:
            env.reset()
        self.returns[:] = 0
        self.lengths[:] = 0
        return self._observe()

    def step(self, actions: np.ndarray):
        rewards = np.zeros(len(self.envs), dtype=np.float32)
        dones = np.zeros(len(self.envs), dtype=bool)
        finished = []
        for index, (env, action) in enumerate(zip(self.envs, actions)):
            reward, done = env.act(self.actions[int(action)])
            rewards[index], dones[index] = reward, done
            self.returns[index] += reward
            self.lengths[index] += 1
            if done:
                finished.append((float(self.returns[index]), int(self.lengths[index])))
                self.returns[index], self.lengths[index] = 0, 0
                env.reset()
        return self._observe(), torch.from_numpy(rewards), torch.from_numpy(dones), finished

    def state(self) -> dict:
        return {"envs": self.envs, "returns": self.returns.copy(), "lengths": self.lengths.copy()}

    def load_state(self, state: dict) -> None:
        self.envs, self.returns, self.lengths = state["envs"], state["returns"], state["lengths"]


class AtariVector(VectorEnv):
    frames_per_step = 4

    def __init__(self, game: str, num_envs: int, seed: int) -> None:
        try:
            from ale_py.vector_env import AtariVectorEnv
        except ImportError as error:
            raise ImportError("ALE is not installed: pip install 'neurocoder[rl]' (make setup installs it)") from error
        from ale_py.roms import get_all_rom_ids

        games = get_all_rom_ids()
        if game not in games:
            near = [g for g in games if g.replace("_", "") == game.lower().replace("_", "")]
            hint = f"; did you mean {near[0]!r}?" if near else f" ({len(games)} ROMs, e.g. pong, breakout, ms_pacman)"
            raise ValueError(f"unknown Atari game {game!r}: ALE names its ROMs in snake_case{hint}")
        self.env = AtariVectorEnv(game=game, num_envs=num_envs, num_threads=1, autoreset_mode="SameStep",
                                  reward_clipping=False, repeat_action_probability=0.0, frameskip=4,
                                  stack_num=4, img_height=84, img_width=84, grayscale=True)
        self.seed = seed
        self.num_actions = int(self.env.single_action_space.n)
        self.observation_shape = (4, 84, 84)
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, dtype=np.int64)

    def reset(self) -> torch.Tensor:
        observations, _ = self.env.reset(seed=self.seed)
        self.returns[:] = 0
        self.lengths[:] = 0
        return torch.from_numpy(np.asarray(observations)).float() / 255.0

    def step(self, actions: np.ndarray):
        observations, rewards, terminated, truncated, _ = self.env.step(np.asarray(actions))
        dones = np.logical_or(terminated, truncated)
        finished = self._account(rewards, dones)
        return (torch.from_numpy(np.asarray(observations)).float() / 255.0,
                torch.from_numpy(np.sign(rewards).astype(np.float32)), torch.from_numpy(dones), finished)

    def close(self) -> None:
        self.env.close()


class GymVector(VectorEnv):
    def __init__(self, env_id: str, num_envs: int, seed: int) -> None:
        import gymnasium as gym

        try:
            self.env = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(num_envs)],
                                                autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
        except gym.error.Error as error:
            raise ValueError(f"gymnasium could not make {env_id!r}: {error}") from error
        if not isinstance(self.env.single_action_space, gym.spaces.Discrete):
            raise ValueError(f"{env_id}: the agent needs discrete actions, got {self.env.single_action_space}")
        self.seed = seed
        self.num_actions = int(self.env.single_action_space.n)
        self.observation_shape = tuple(self.env.single_observation_space.shape)
        self.returns = np.zeros(num_envs)
        self.lengths = np.zeros(num_envs, dtype=np.int64)

    def reset(self) -> torch.Tensor:
        observations, _ = self.env.reset(seed=self.seed)
        self.returns[:] = 0
        self.lengths[:] = 0
        return torch.as_tensor(np.asarray(observations), dtype=torch.float32)

    def step(self, actions: np.ndarray):
        observations, rewards, terminated, truncated, _ = self.env.step(np.asarray(actions))
        dones = np.logical_or(terminated, truncated)
        finished = self._account(rewards, dones)
        return (torch.as_tensor(np.asarray(observations), dtype=torch.float32),
                torch.as_tensor(rewards, dtype=torch.float32), torch.from_numpy(dones), finished)

    def close(self) -> None:
        self.env.close()


def make_vector_env(name: str, num_envs: int, seed: int) -> VectorEnv:
    """See the module docstring for the names understood."""
    if name.startswith("minatar:"):
        return MinAtarVector(name.split(":", 1)[1], num_envs, seed)
    if name.startswith("atari:"):
        return AtariVector(name.split(":", 1)[1], num_envs, seed)
    return GymVector(name, num_envs, seed)
