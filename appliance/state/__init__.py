"""Shared state of the roles: the store, sessions (and the leases they are bound to)."""
