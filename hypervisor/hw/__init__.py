"""What the CPU does under the hypervisor: virtualization hardware as data plus its algorithms.

One module per mechanism (``avic``: AMD AVIC's tables, exit information and the ICR-write
algorithm).  This layer holds no KVM policy: it is what the silicon does with the structures KVM
fills in.  It sits above ``hypervisor.host`` (pCPUs, atomic steps) and below KVM's software
(``hypervisor``); it reaches the layer above only through Protocols it declares.

Not modelled here: KVM's handling of the exits these mechanisms raise (``hypervisor.accel``).
"""
