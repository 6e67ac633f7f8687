"""Reaching a home behind NAT: links to a relay, and streams over them that survive a drop.

Shared by the three parties: the household's personal agent (which registers), the
appliance (which opens streams to a household) and the relay (which joins the two).
See docs/home-relay.md for the design.
"""
