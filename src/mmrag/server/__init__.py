"""The HTTP service and web page over a memory: `create_app`, and `serve` to run it."""

from mmrag.server.app import create_app
from mmrag.server.capabilities import Capabilities
from mmrag.server.config import ServerConfig
from mmrag.server.run import serve

__all__ = ["Capabilities", "ServerConfig", "create_app", "serve"]
