"""An active/standby pair of appliances on one guest segment (docs/design.md)."""
