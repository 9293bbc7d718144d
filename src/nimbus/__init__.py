"""Nimbus: a self-hosted serverless platform.

This module imports nothing: the guest agent imports ``nimbus.protocol`` inside every machine and
must start in milliseconds.
"""

__version__ = "0.1.0"
