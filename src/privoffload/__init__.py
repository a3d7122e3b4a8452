"""privoffload: private image classification offloading (Leroux et al. obfuscation, Hoefer & Salinas Monroy protocol)."""

__version__ = "0.1.0"
