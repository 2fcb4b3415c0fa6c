"""The cachestack orchestrator: `python -m orchestrate up` builds and runs the stack with the
Docker SDK. Other deployment formats and their tests use the same description and checks:

    from orchestrate import describe_stack, as_dict, run_smoke
    as_dict(describe_stack("cachestack", 8000))   # plain data of the whole stack
    run_smoke("http://127.0.0.1:8000")              # True when every smoke check passed
"""

from .smoke import run_smoke
from .stack import as_dict, describe_stack

__all__ = ["as_dict", "describe_stack", "run_smoke"]
