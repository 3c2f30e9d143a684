"""streamd: one durable, ordered, resumable event stream for image-generation jobs."""

__version__ = "0.1.0"
