"""The device side: obfuscate locally, upload only O(x), read the classes and the model version.

The client knows only the obfuscator (and whatever the cloud chooses to publish).
"""

from .client import (DEFAULT_MODEL, AuthError, BadServer, Client, ClientError, RequestRejected, Result,
                     ServerUnavailable, WeightsUnavailable)
from .images import read_images
from .obfuscator import load_obfuscator, quantize

__all__ = ["Client", "Result", "ClientError", "ServerUnavailable", "AuthError", "RequestRejected", "BadServer", "WeightsUnavailable",
           "DEFAULT_MODEL", "load_obfuscator", "quantize", "read_images"]
