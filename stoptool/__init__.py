"""stoptool: StoP on I-JEPA."""
__version__ = "0.1.0"
