"""The forkd guest agent: runs inside every sandbox and serves the forkd protocol.

Depends only on the standard library, msgpack and ``forkd.protocol`` so that it
runs on a minimal Debian 12 image (python3 + python3-msgpack).
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
