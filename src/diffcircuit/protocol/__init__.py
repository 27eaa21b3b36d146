"""The paper's protocol (``diffcircuit run``): its config, one setup for every command, resumable shards."""

from diffcircuit.protocol.config import RunConfig
from diffcircuit.protocol.runner import run_protocol
from diffcircuit.protocol.setup import Setup, build_setup

__all__ = ["RunConfig", "Setup", "build_setup", "run_protocol"]
