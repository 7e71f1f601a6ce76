"""Checkpoints in and out: Hugging Face safetensors import, the export stream, HF saving."""
