"""DHCPv4 service for the guest side: a sans-IO codec and server, and a thin socket layer."""
