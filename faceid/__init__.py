"""faceid: identity-consistent, pose-driven human video generation on Wan2.1-VACE."""

__version__ = "0.1.0"
