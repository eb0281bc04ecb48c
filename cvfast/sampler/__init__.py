"""Schedulers and the denoising loop."""
