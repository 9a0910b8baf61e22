"""Host access: running outside programs, devices, filesystems."""
