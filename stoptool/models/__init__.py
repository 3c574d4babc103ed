"""Encoder (a timm VisionTransformer) and the StoP predictor."""

from stoptool.models.encoder import ARCHS, ArchSpec, build_encoder, encode, parse_arch
from stoptool.models.pos_embed import sincos_2d
from stoptool.models.predictor import Predictor

__all__ = ["ARCHS", "ArchSpec", "Predictor", "build_encoder", "encode", "parse_arch", "sincos_2d"]
