"""brainshift: pre-operative MR -> intra-operative ultrasound registration."""
__version__ = "0.1.0"
