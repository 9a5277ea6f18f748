"""visionserve's serving runtime. Never imports torch."""

__version__ = "0.1.0"
