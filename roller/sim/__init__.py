"""
Simulators the product itself uses: the fleet simulator behind
C{roller simulate} and C{--demo} (SSH machines that really reboot), and the
BMC and PDU front-ends that share its power state (IPMI via a real
C{ipmi_sim}, Redfish, SNMP PDUs).  Nothing here imports L{roller.testing}.
"""
