"""The guest gateway appliance: private DHCP, captive portal, access rights and service relay."""

__version__ = "0.1.0"
