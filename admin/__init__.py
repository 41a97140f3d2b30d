"""chatctl: the operator's command line (see docs/admin.md)."""
