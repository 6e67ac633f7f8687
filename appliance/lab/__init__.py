"""The lab: a whole site in network namespaces, for trying the appliance and for its tests."""
