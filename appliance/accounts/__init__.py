"""Accounts the site keeps: visitors' site accounts and the admins."""
