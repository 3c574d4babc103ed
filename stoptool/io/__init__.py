"""Checkpoints and models in and out: stoptool's own checkpoints are safetensors, written and
read without pickle; official `.pth.tar` files and `.pth`/`.bin` weights are read only by
`official.py`, with `torch.load(weights_only=True)` (tensors and plain containers, no code)."""
