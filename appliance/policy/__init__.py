"""The site's tables: access rights, server info, trusted agents; loaded, checked and
reloaded together (`Policy`)."""

from appliance.policy.tables import Policy

__all__ = ["Policy"]
