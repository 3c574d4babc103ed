"""Encoder (a timm VisionTransformer, `encoder`), the StoP predictor (`predictor`), the two
together (`jepa`), and the arch names (`archs`). Nothing is imported here, so that a command
that only reads a name or a config does not load timm."""
