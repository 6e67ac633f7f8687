"""Shared state of the roles: the store, the leases (dhcp/ writes them), the sessions."""
