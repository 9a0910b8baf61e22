"""Disk image formats: headers parsed in Python, everything else through qemu-img.

``probe`` reads image headers itself (no fork per file, so refreshing a pool of
thousands of volumes stays fast); ``qcow2`` writes empty qcow2 images itself;
``qemuimg`` wraps qemu-img for the rest (preallocation, encryption, conversion,
checks, resizing); ``raw`` creates raw files with plain system calls.
"""
