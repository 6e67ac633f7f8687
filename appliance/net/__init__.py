"""The guest side of the appliance: interface, nftables isolation and interception."""
