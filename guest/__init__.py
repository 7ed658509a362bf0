"""A Linux-like guest stub running on the vCPUs of a ``hypervisor.Vm``."""
