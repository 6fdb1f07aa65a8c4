"""storyseek: small DeepSeek-V3-architecture models that write children's stories."""

__version__ = "0.1.0"
