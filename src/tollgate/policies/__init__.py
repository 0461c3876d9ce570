"""Policies, one module each. Importing this package registers every built-in policy."""

from tollgate.policies import cors, key_auth, rate_limit, request_id, request_size_limit
from tollgate.policies.base import Policy, register, registry

__all__ = [
    "Policy",
    "cors",
    "key_auth",
    "rate_limit",
    "register",
    "registry",
    "request_id",
    "request_size_limit",
]
