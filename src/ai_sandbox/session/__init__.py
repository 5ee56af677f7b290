"""Talking to the guest: SSH keys, the pinned host key, ssh_config, exec."""
