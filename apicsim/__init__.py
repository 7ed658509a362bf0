"""User-facing tools: the ``apicsim`` command, the scenario runner, the real-KVM backend."""
