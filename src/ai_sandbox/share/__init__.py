"""How the host's workspace directory appears in the guest at /workspace.

Modes: `virtiofs` (QEMU; virtiofsd), `sftp` (any VMM: reverse sshfs over the control connection, see `sftp`)
and `copy` (an ext4 image filled at start and merged back at stop, see `copy`).
"""
