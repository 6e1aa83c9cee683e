"""Drivers: how roller reaches machines (SSH, IPMI, SNMP PDUs, Redfish, Xen, liveness)."""
