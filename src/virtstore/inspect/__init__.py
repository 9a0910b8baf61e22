"""Looking inside a guest's disk from its bytes: partitions, filesystems and their usage,
the boot files, the operating system.

Guest filesystems are hostile input. Nothing here mounts them: the volume's bytes come
through qemu (a read-only NBD export, so every format and location qemu opens works),
and filesystems are read in userspace, by The Sleuth Kit (pytsk3) where it reads the
filesystem and by our own superblock parsers for the numbers df needs. The readers run
in a child process (``worker``) with a time and memory limit, one filesystem at a time,
so a malformed filesystem costs an error for itself and nothing else.
"""
