"""Python side of the Snakepit bridge: generated wire types plus the telemetry stream.

Importing this package stays cheap; ``snakepit_telemetry.telemetry`` pulls in gRPC.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
