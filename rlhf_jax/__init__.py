"""rlhf_jax: SFT, reward modelling and PPO from human feedback, in JAX."""

__version__ = "0.1.0"
