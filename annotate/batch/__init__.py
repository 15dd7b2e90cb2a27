"""Batch mode: the same requests as live mode, answered through the providers' Batch APIs at half price."""
