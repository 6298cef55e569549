"""On-device multi-turn rollout: the zoom-in tool, observations and sampling."""
