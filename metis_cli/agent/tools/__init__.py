"""Tools the agent may call: the protocol (base), the built-ins and the registry that runs them.

Built-ins: `calculator` (calculator.py), `python` (python_sandbox.py with sandbox_isolation.py,
sandbox_prelude.py, pids_cgroup.py), `search` (search.py), and the image tools `zoom_in`
(zoom.py) and `image_search` (image_search.py). Heavy dependencies are imported only when a tool
is built.
"""

from metis_cli.agent.tools.base import Tool, ToolContext, ToolErrorKind, ToolResult, tool_spec
from metis_cli.agent.tools.registry import BUILTIN_TOOLS, ToolRegistry

__all__ = ["BUILTIN_TOOLS", "Tool", "ToolContext", "ToolErrorKind", "ToolRegistry", "ToolResult", "tool_spec"]
