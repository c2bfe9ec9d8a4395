"""pgpcl: continual learning with Prompt Gradient Projection and the prompt-based learners it builds on."""

__version__ = "0.1.0"
