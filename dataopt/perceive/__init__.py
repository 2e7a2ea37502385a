"""perceive."""
