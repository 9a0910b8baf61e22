"""The ``virtstore`` command line: virsh's storage commands over the Connection API."""
