"""deepeyes-jax: DeepEyes ("thinking with images" RL) natively in JAX."""
