"""Checkpoint reading and writing (safetensors only; no pickle)."""
