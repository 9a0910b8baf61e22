"""Disk image formats: headers parsed in Python, everything else through qemu-img.

``probe`` reads image headers itself (no fork per file, so refreshing a pool of
thousands of volumes stays fast); ``qcow2`` writes empty qcow2 images itself;
``native`` picks that no-fork path when the options allow it; ``qemuimg`` wraps
qemu-img for the rest (encryption, preallocation, conversion, checks, resizing);
``raw`` creates raw files with plain system calls. See docs/formats.md.

Only the standard-library-only modules are imported here, so importing the
package stays cheap for the CLI.
"""

from virtstore.formats.probe import ImageInfo, backing_chain, probe_image
from virtstore.formats.qcow2 import create_qcow2

__all__ = ["ImageInfo", "backing_chain", "create_qcow2", "probe_image"]
